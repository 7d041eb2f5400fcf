"""Methods by name: what each is, its options (validated in one place), what it needs.

A new method is one drafter file plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specdec.errors import InvalidRequestError
from specdec.spec.drafters.base import Drafter, NoDrafter


@dataclass(frozen=True)
class Option:
    type: type
    default: Any
    help: str
    minimum: float | None = None


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    lossless: bool
    needs: tuple[str, ...]  # "draft_model", "trained_weights", "hidden_states"
    options: dict[str, Option] = field(default_factory=dict)
    # build(context, options) -> Drafter; context offers load_draft(spec) and target facts
    build: Callable[[Any, dict[str, Any]], Drafter] | None = None

    def validate(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise InvalidRequestError(
                f"method {self.name!r} takes no option {unknown[0]!r} (its options: {known})"
            )
        out = {}
        for key, opt in self.options.items():
            value = options.get(key, opt.default)
            if value is None:
                out[key] = None
                continue
            try:
                value = opt.type(value)
            except (TypeError, ValueError):
                raise InvalidRequestError(
                    f"option {key} of method {self.name!r} must be "
                    f"{getattr(opt.type, '__name__', 'a value').lstrip('_')}, got {value!r}"
                ) from None
            if opt.minimum is not None and value < opt.minimum:
                raise InvalidRequestError(f"option {key} must be >= {opt.minimum}, got {value}")
            out[key] = value
        return out


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    """An option type accepting one of ``choices`` (case and ``_`` / ``-`` insensitive)."""

    def parse(value: Any) -> str:
        text = str(value).strip().lower().replace("_", "-")
        if text not in choices:
            raise ValueError(value)
        return text

    parse.__name__ = "one of " + ", ".join(choices)
    return parse


def _build_ar(ctx: Any, opts: dict[str, Any]) -> Drafter:
    return NoDrafter()


def _build_draft(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.spec.drafters.draft_model import DraftModelDrafter

    if not opts["draft_model"]:
        raise InvalidRequestError("method 'draft' needs a draft model: --draft MODEL")
    from specdec.spec.policies import AdaptiveLength, FixedLength

    siblings, verifier = opts["siblings"], opts["verifier"]
    static = bool(opts["tree"]) and str(opts["tree"]).strip().lower() != "dynamic"
    if (siblings != "iid" or verifier != "specinfer") and not static:
        raise InvalidRequestError(
            f"siblings={siblings} / verifier={verifier} apply to a static tree: add tree=3,2,1"
        )
    if verifier == "spectr" and siblings != "iid":
        raise InvalidRequestError(
            "verifier=spectr selects among i.i.d. siblings (siblings=iid); siblings drawn "
            f"{'by beam search' if siblings == 'beam' else 'without replacement'} are verified "
            "exactly by recursive rejection sampling (verifier=specinfer)"
        )
    draft = ctx.load_draft(opts["draft_model"])
    kind = AdaptiveLength if opts["adaptive"] else FixedLength
    policy = kind(opts["num_draft_tokens"], confidence=opts["confidence"])
    branching, budget = None, None
    if str(opts["tree"]).strip().lower() == "dynamic":
        from specdec.spec.policies import TreeBudget

        target_cost, draft_cost = ctx.pass_costs(opts["draft_model"])
        budget = TreeBudget(target_cost, draft_cost, max_nodes=opts["tree_nodes"])
    elif opts["tree"]:
        try:
            branching = [int(x) for x in str(opts["tree"]).split(",")]
        except ValueError:
            raise InvalidRequestError(
                f"tree must be 'dynamic' or look like 3,2,1, got {opts['tree']!r}"
            ) from None
    return DraftModelDrafter(
        draft,
        ctx.vocab_size,
        policy=policy,
        branching=branching,
        tree_budget=budget,
        width=opts["tree_width"],
        max_depth=opts["tree_depth"],
        sibling_sampling=siblings.replace("-", "_"),
        verify=verifier,
    )


def _build_cross_vocab(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.spec.drafters.cross_vocab import CrossVocabDrafter
    from specdec.spec.policies import AdaptiveLength, FixedLength

    if not opts["draft_model"]:
        raise InvalidRequestError("method 'cross-vocab' needs a draft model: --draft MODEL")
    draft, draft_tokenizer = ctx.load_draft(opts["draft_model"], same_tokenizer=False)
    kind = AdaptiveLength if opts["adaptive"] else FixedLength
    return CrossVocabDrafter(
        draft,
        draft_tokenizer,
        ctx.tokenizer,
        policy=kind(opts["num_draft_tokens"]),
        target_vocab_size=ctx.vocab_size,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "ar",
            "plain autoregressive decoding: one token per target pass (the baseline)",
            lossless=True,
            needs=(),
            build=_build_ar,
        ),
        Method(
            "draft",
            "a small draft model of the same vocabulary proposes a chain or a tree (static, "
            "multi-draft, or dynamic and sized by measured pass costs); the target verifies it "
            "in one pass (Leviathan et al. 2023, Chen et al. 2023; SpecInfer, SpecTr, RSD, "
            "EAGLE-2/DySpec trees)",
            lossless=True,
            needs=("draft_model",),
            build=_build_draft,
            options={
                "draft_model": Option(str, None, "the draft model (name, GGUF, folder)"),
                "num_draft_tokens": Option(
                    int, 4, "tokens drafted per step (the start, if adaptive)", minimum=1
                ),
                "tree": Option(
                    str,
                    None,
                    "draft a tree instead of a chain: 'dynamic' (grown by the drafter's path "
                    "probability, sized by the measured pass costs) or a static shape, children "
                    "per node at each depth, e.g. 3,2,1",
                ),
                "tree_width": Option(
                    int, 4, "dynamic tree: nodes expanded per depth, children per node", minimum=1
                ),
                "tree_depth": Option(int, 8, "dynamic tree: most depths", minimum=1),
                "tree_nodes": Option(
                    int, 32, "dynamic tree: most nodes verified in one pass", minimum=1
                ),
                "siblings": Option(
                    _one_of("iid", "without-replacement", "beam"),
                    "iid",
                    "static tree under sampling: siblings drawn i.i.d. (SpecInfer, SpecTr), "
                    "without replacement (RSD-C), or by stochastic beam search of width "
                    "max(tree) (RSD-S); greedy drafts the top tokens (beam: beam search)",
                ),
                "verifier": Option(
                    _one_of("specinfer", "spectr"),
                    "specinfer",
                    "static tree under sampling: recursive rejection sampling (specinfer) or "
                    "SpecTr's k-sequential selection (spectr, needs siblings=iid)",
                ),
                "adaptive": Option(
                    _boolean,
                    False,
                    "lengthen after full acceptance (+2), shorten after a rejection (-1)",
                ),
                "confidence": Option(
                    float,
                    0.0,
                    "stop drafting when the drafter's top probability falls below this",
                    minimum=0.0,
                ),
            },
        ),
        Method(
            "cross-vocab",
            "a draft model with another tokenizer drafts text; its text is re-tokenised into "
            "target tokens and verified as a chain (universal assisted generation; OmniDraft's "
            "cross-vocabulary setting)",
            lossless=True,
            needs=("draft_model",),
            build=_build_cross_vocab,
            options={
                "draft_model": Option(str, None, "the draft model (any tokenizer)"),
                "num_draft_tokens": Option(
                    int,
                    4,
                    "draft-model tokens drafted per step (the start, if adaptive)",
                    minimum=1,
                ),
                "adaptive": Option(
                    _boolean,
                    False,
                    "lengthen after full acceptance (+2), shorten after a rejection (-1)",
                ),
            },
        ),
    )
}

# The fastest lossless method measured per target on a 2-core CPU (docs/BENCHMARKS.md).
# Targets not listed decode with `ar` until a measurement says otherwise.
AUTO: dict[str, tuple[str, dict[str, Any]]] = {
    # dynamic tree 1.81x, chain k=4 1.35x over ar (bfloat16, `specdec bench --dataset mixed
    # --limit 1 --max-new-tokens 128`); the 20-prompt, 256-token run is in docs/BENCHMARKS.md
    "qwen2.5-coder-1.5b": ("draft", {"draft_model": "qwen2.5-coder-0.5b", "tree": "dynamic"}),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InvalidRequestError(
            f"unknown method {name!r} (known: auto, {', '.join(METHODS)}; see `specdec methods`)"
        )
    return METHODS[name]


def resolve_auto(model: str) -> tuple[str, dict[str, Any]]:
    return AUTO.get(model, ("ar", {}))
