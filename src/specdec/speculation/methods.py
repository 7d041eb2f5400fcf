"""Methods by name: what each is, its options (validated in one place), what it needs.

A new method is one drafter file plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import Drafter, NoDrafter


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


def _ngram_options(longest: int, looked: str = "looked up") -> dict[str, Option]:
    return {
        "min_ngram": Option(int, 1, f"shortest n-gram {looked}", minimum=1),
        "max_ngram": Option(int, longest, f"longest n-gram {looked} (tried first)", minimum=1),
    }


def _max_nodes(default: int) -> dict[str, Option]:
    return {"max_nodes": Option(int, default, "most tree nodes verified in one pass", minimum=1)}


_JOINT = Option(
    _boolean,
    True,
    "cut the union of the parts' trees once more, by the chances of acceptance the parts "
    "give their nodes, to what pays on the target's pass-cost curve (else each part sizes "
    "its own tree and the union is verified whole)",
)

_SIZE_BY_COST = Option(
    _boolean,
    True,
    "pick the tree size that maximises expected tokens per unit of the target's measured "
    "pass time (else always max_nodes)",
)

_PROMPT_ROWS = Option(
    int,
    128,
    "prompt tokens not yet known learnt from the prefill's logits (the LM head once per "
    "row); 0: learn only from verification passes, as in the paper",
    minimum=0,
)


def _build_ar(ctx: Any, opts: dict[str, Any]) -> Drafter:
    return NoDrafter()


def _build_draft(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.draft_model import DraftModelDrafter

    if not opts["draft_model"]:
        raise InvalidRequestError("method 'draft' needs a draft model: --draft MODEL")
    from specdec.speculation.draft_length import AdaptiveLength, FixedLength

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
    if opts["draft_vocab"]:
        draft = _vocab_subset(ctx, draft, opts["draft_vocab"])
    kind = AdaptiveLength if opts["adaptive"] else FixedLength
    policy = kind(opts["num_draft_tokens"], confidence=opts["confidence"])
    branching, budget = None, None
    if str(opts["tree"]).strip().lower() == "dynamic":
        from specdec.speculation.sizing import TreeBudget

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


def _vocab_subset(ctx: Any, draft: Any, n: int) -> Any:
    """``draft`` computing logits over token ids below ``n`` and the end tokens only."""
    import torch

    from specdec.models.target import NativeTarget, VocabSubset

    if not isinstance(draft, NativeTarget):
        raise InvalidRequestError("draft_vocab needs a draft on the native backend")
    vocab = draft.config.vocab_size
    ends = [t for t in ctx.tokenizer.eos_token_ids if t < vocab]
    return VocabSubset(draft, torch.cat([torch.arange(min(n, vocab)), torch.tensor(ends)]))


def _build_cross_vocab(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.cross_vocab import CrossVocabDrafter
    from specdec.speculation.draft_length import AdaptiveLength, FixedLength

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


def _sized_by_cost(ctx: Any, opts: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``opts`` without ``size_by_cost``, and the target's pass-cost curve if that option
    asks for it (and the context can measure one), else None."""
    opts = dict(opts)
    by_cost = opts.pop("size_by_cost")
    return opts, ctx.pass_cost() if by_cost and hasattr(ctx, "pass_cost") else None


def _build_pld(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.prompt_lookup import PromptLookupDrafter

    opts, cost = _sized_by_cost(ctx, opts)
    return PromptLookupDrafter(pass_cost=cost, **opts)


def _build_ngram_cache(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.ngram_cache import NgramCacheDrafter

    opts, cost = _sized_by_cost(ctx, opts)
    return NgramCacheDrafter(pass_cost=cost, **opts)


def _build_lookahead(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.lookahead import LookaheadDrafter

    opts, cost = _sized_by_cost(ctx, opts)
    return LookaheadDrafter(pass_cost=cost, **opts)


def _build_stand(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.stand import StandDrafter

    opts, cost = _sized_by_cost(ctx, opts)
    return StandDrafter(ctx.vocab_size, pass_cost=cost, **opts)


def _build_recycle(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.drafters.token_recycling import TokenRecyclingDrafter

    opts, cost = _sized_by_cost(ctx, opts)
    return TokenRecyclingDrafter(
        ctx.vocab_size,
        top_k=opts["top_k"],
        max_nodes=opts["max_nodes"],
        max_depth=opts["max_depth"],
        pass_cost=cost,
        matrix_file=opts["matrix_file"],
        prompt_rows=opts["prompt_rows"],
    )


def _build_rest(ctx: Any, opts: dict[str, Any]) -> Drafter:
    from specdec.speculation.datastore import open_datastore
    from specdec.speculation.drafters.retrieval import RetrievalDrafter

    opts, cost = _sized_by_cost(ctx, opts)
    store = open_datastore(opts.pop("datastore"), ctx.tokenizer, getattr(ctx, "progress", False))
    return RetrievalDrafter(store, pass_cost=cost, **opts)


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
                "draft_vocab": Option(
                    int,
                    0,
                    "the draft's logits over the N lowest token ids only (and the end tokens): "
                    "its LM head at N/vocabulary of the cost; byte-level BPE numbers tokens in "
                    "merge order, roughly most frequent first. 0: the whole vocabulary",
                    minimum=0,
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
        Method(
            "pld",
            "prompt lookup decoding: the last n-gram's earlier occurrences in the prompt and "
            "output propose what followed them, several matches as one tree (Saxena 2023)",
            lossless=True,
            needs=(),
            build=_build_pld,
            options={
                "num_draft_tokens": Option(int, 10, "tokens copied per match", minimum=1),
                **_ngram_options(3, "matched"),
                "branches": Option(int, 3, "most matches merged into the tree", minimum=1),
                **_max_nodes(16),
                "size_by_cost": _SIZE_BY_COST,
            },
        ),
        Method(
            "ngram-cache",
            "an n-gram cache across requests: the most frequent continuations of the longest "
            "n-gram seen in earlier prompts and outputs (llama.cpp's lookup cache, OmniDraft)",
            lossless=True,
            needs=(),
            build=_build_ngram_cache,
            options={
                "num_draft_tokens": Option(int, 8, "most tokens per branch", minimum=1),
                **_ngram_options(4),
                "branches": Option(int, 2, "next tokens tried at the first level", minimum=1),
                **_max_nodes(16),
                "min_count": Option(int, 1, "observations needed to extend a branch", minimum=1),
                "min_share": Option(
                    float, 0.3, "share of the n-gram's observations needed to extend", minimum=0
                ),
                "max_entries": Option(int, 2_000_000, "most n-grams kept", minimum=1),
                "size_by_cost": _SIZE_BY_COST,
            },
        ),
        Method(
            "stand",
            "STAND: an n-gram model of the target's own top-10 distributions (running means), "
            "drafted stochastically without replacement (Gumbel-Top-k) in a tree whose shape "
            "is learnt from acceptance (Song et al. 2025)",
            lossless=True,
            needs=(),
            build=_build_stand,
            options={
                "top_k": Option(int, 10, "tokens kept per n-gram", minimum=1),
                **_ngram_options(4),
                **_max_nodes(24),
                "max_depth": Option(int, 8, "deepest tree level", minimum=1),
                "size_by_cost": _SIZE_BY_COST,
                "max_entries": Option(int, 2_000_000, "most n-grams kept", minimum=1),
                "prompt_rows": _PROMPT_ROWS,
            },
        ),
        Method(
            "lookahead",
            "Lookahead decoding: Jacobi iterations over a window of future positions, run in "
            "the same pass, fill an n-gram pool whose n-grams starting with the last token are "
            "verified (Fu et al. 2024)",
            lossless=True,
            needs=(),
            build=_build_lookahead,
            options={
                "window": Option(int, 4, "positions looked ahead (W)", minimum=2),
                "ngram": Option(int, 4, "n-gram size (N): N - 1 Jacobi levels", minimum=3),
                "guesses": Option(int, 4, "n-grams verified per pass (G)", minimum=1),
                "pool_from_prompt": Option(
                    _boolean, True, "seed the pool with the prompt's and the output's n-grams"
                ),
                "size_by_cost": Option(
                    _boolean,
                    True,
                    "cut the guesses to what pays on the target's measured pass-cost curve, and "
                    "run the window only while what it earns pays for its nodes (else every "
                    "pass runs the whole window and all guesses)",
                ),
            },
        ),
        Method(
            "rest",
            "REST, retrieval drafting: the longest suffix of the context (16 down to 2 tokens) "
            "looked up in a datastore (suffix array over a corpus); the continuations found "
            "form a frequency-weighted tree (He et al. 2023)",
            lossless=True,
            needs=(),
            build=_build_rest,
            options={
                "datastore": Option(
                    str,
                    "stdlib",
                    "datastore folder (`specdec datastore build`); stdlib: the Python standard "
                    "library's source, built for the model's tokenizer on first use",
                ),
                **_max_nodes(16),
                "continuation": Option(int, 10, "tokens retrieved after each match", minimum=1),
                "max_span": Option(int, 16, "longest suffix looked up", minimum=1),
                "min_span": Option(int, 2, "shortest suffix looked up", minimum=1),
                "max_matches": Option(int, 512, "most matches used per step", minimum=1),
                "size_by_cost": _SIZE_BY_COST,
            },
        ),
        Method(
            "recycle",
            "Token Recycling: the target's own top-k tokens after each token, kept in an "
            "adjacency matrix and updated by every pass, drafted as a tree (Luo et al. 2024)",
            lossless=True,
            needs=(),
            build=_build_recycle,
            options={
                "top_k": Option(int, 8, "candidates kept per token", minimum=1),
                **_max_nodes(24),
                "max_depth": Option(int, 8, "deepest tree level", minimum=1),
                "size_by_cost": _SIZE_BY_COST,
                "matrix_file": Option(
                    str,
                    None,
                    "safetensors file the matrix starts from (if it exists) and is saved to "
                    "(before each request and at exit)",
                ),
                "prompt_rows": _PROMPT_ROWS,
            },
        ),
    )
}

# The fastest lossless method measured per target and kind of weights ("float": --quant
# none; "quantised": the native kernel) on a 2-core CPU (docs/BENCHMARKS.md). Targets not
# listed decode with `ar` until a measurement says otherwise.
AUTO: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "qwen2.5-coder-1.5b": {
        # dynamic tree 1.81x, chain k=4 1.35x over ar (bfloat16, `specdec bench --dataset
        # mixed --limit 1 --max-new-tokens 128`); the 20-prompt, 256-token run is in
        # docs/BENCHMARKS.md
        "float": ("draft", {"draft_model": "qwen2.5-coder-0.5b", "tree": "dynamic"}),
        # Spec-Bench subset, 12 questions x 128 tokens, --quant gguf, four runs: pld (sized
        # by the pass-cost curve) 1.16-1.25x, ngram-cache 1.14-1.19x, recycle 1.05-1.07x;
        # the dynamic draft tree was 0.89x (a pass over 4 tokens costs ~1.2-1.5x one)
        "quantised": ("pld", {}),
    },
    "smollm2-135m": {
        # Spec-Bench subset, 12 questions x 128 tokens (docs/BENCHMARKS.md, issue 7): in
        # bfloat16 pld+recycle 1.67x, pld 1.63x; on its gguf weights (a 7 ms step) pld 1.19x,
        # ngram-cache 1.20x (pld keeps nothing across requests, and ties)
        "float": ("pld+recycle", {}),
        "quantised": ("pld", {}),
    },
}


def get_method(name: str) -> Method:
    if "+" in name:
        return _merged_method(name)
    if name not in METHODS:
        raise InvalidRequestError(
            f"unknown method {name!r} (known: auto, {', '.join(METHODS)}; see `specdec methods`)"
        )
    return METHODS[name]


def is_method(name: str) -> bool:
    """A registered method, or a valid merge of them (``pld+recycle``)."""
    try:
        get_method(name)
    except InvalidRequestError:
        return False
    return True


def _merged_method(name: str) -> Method:
    """``pld+recycle``: the parts' trees merged into one (`MergedDrafter`); an option goes
    to every part that takes it."""
    parts = [get_method(p.strip()) for p in name.split("+")]
    if len(parts) < 2 or any(p.name == "ar" for p in parts):
        raise InvalidRequestError(f"{name!r}: merge two or more drafting methods, e.g. pld+recycle")
    # no defaults here: a part gets only the options given, and its own defaults for the rest
    options: dict[str, Option] = {"joint": _JOINT}
    for p in parts:
        for key, opt in p.options.items():
            options.setdefault(key, Option(opt.type, None, opt.help, opt.minimum))

    def build(ctx: Any, opts: dict[str, Any]) -> Drafter:
        from specdec.speculation.drafters.merged import MergedDrafter

        given = {k: v for k, v in opts.items() if v is not None}
        # the union is sized jointly unless that or sizing by cost is turned off
        joint = (
            given.pop("joint", True)
            and given.get("size_by_cost", True)
            and hasattr(ctx, "pass_cost")
        )
        return MergedDrafter(
            [
                p.build(ctx, p.validate({k: v for k, v in given.items() if k in p.options}))
                for p in parts
            ],
            pass_cost=ctx.pass_cost() if joint else None,
        )

    return Method(
        name,
        "one tree from several drafters: " + ", ".join(p.name for p in parts),
        lossless=all(p.lossless for p in parts),
        needs=tuple(sorted({n for p in parts for n in p.needs})),
        options=options,
        build=build,
    )


def effective_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every option ``name`` runs with, defaults included; for a merge (``pld+recycle``)
    one such dict per part, since each part keeps its own defaults."""
    if "+" not in name:
        return get_method(name).validate(given)
    merge = get_method(name)  # the merge itself is valid
    parts = [get_method(p.strip()) for p in name.split("+")]
    out = {
        p.name: p.validate({k: v for k, v in given.items() if k in p.options and v is not None})
        for p in parts
    }
    out["merge"] = {"joint": merge.validate(given).get("joint")}
    return out


def resolve_auto(model: str, quant: str = "none") -> tuple[str, dict[str, Any]]:
    """What ``auto`` runs for ``model`` whose linears hold ``quant`` (resolved, not auto)."""
    return AUTO.get(model, {}).get("float" if quant == "none" else "quantised", ("ar", {}))
