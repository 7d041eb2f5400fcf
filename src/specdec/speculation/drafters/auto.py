"""`auto`: each step, the drafter that has earned the most committed tokens per second here.

The drafters to choose among (the *arms*: prompt lookup, the n-gram cache, draft
models of the target's vocabulary found in the cache, each in one or more weight
formats, and plain decoding) are built once. Each step the model-free ones propose
(a few dictionary look-ups each); one that finds nothing is out for this step, and
the size of the tree it found is the *situation* its record is kept under (a long
match of prompt lookup is worth more than a single guessed token). Drafters that run
a model propose only when chosen. A discounted-UCB bandit (`StepBandit`) picks the arm
with the best upper bound on committed tokens per second, from what each arm's steps
took here, end to end: drafting, the target's pass and verification. The record is
kept per sampling mode, and, with ``remember``, in the cache per target model,
weights, device and machine, so that a process starts from what the last one learnt
(`specdec auto --reset` forgets it).

An EAGLE head (``eagle``, when `specdec train eagle` made one for the model) is an arm
like a draft model; it reads the target's hidden states of every step, chosen or not.

A draft model reads the prompt the first time it is chosen in a request: a cost of the
request, not of its steps, so it is timed apart and, once measured, weighed before the
model is first chosen (spread over the tokens left: on a long prompt with few tokens to
go, it does not pay). A draft model not chosen for a while catches up on the committed
tokens when next chosen (`DraftModelDrafter._sync`), and that is charged to its step.

In a batch (`specdec serve`), a step is timed by the request's clock (`DraftState.clock`):
each shared pass counts what the request's rows would cost alone, so the record learnt
while serving is the one `specdec generate` uses; and a draft model that has not read
the request's prompt is not started while other requests share the pass (its reading
would stall them all).

Only the choice of tree is learnt: every tree is verified by the lossless verifier,
so `auto` is exactly as lossless as its arms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import (
    BuildContext,
    Drafter,
    DraftState,
    NoDrafter,
    layer_features,
)
from specdec.speculation.options import Options, option, optional_str
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.step_bandit import ALL, StepBandit
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome

DRAFT_QUANTS = ("gguf", "int8", "int4", "none")


@dataclass(frozen=True)
class AutoOptions(Options):
    method: ClassVar[str] = "auto"
    drafters: str = option(
        "pld,ngram-cache,draft",
        "the methods to choose among, comma-separated; 'draft': one arm per draft model "
        "and weight format; 'eagle': the model's trained head, if there is one (plain "
        "decoding is always among them)",
    )
    draft_model: str | None = option(
        None,
        "draft models for 'draft', comma-separated (default: known models of the target's "
        "vocabulary present in the cache)",
        parse=optional_str,
    )
    draft_quant: str | None = option(
        None,
        "weight formats of the draft models, comma-separated, each an arm: gguf, int8, int4, "
        "none (default: the target's)",
        parse=optional_str,
    )
    num_draft_tokens: int = option(4, "a draft model's chain length", minimum=1)
    tree: str | None = option(
        None, "a draft model's tree instead of a chain (as method draft: dynamic, 3,2,1)",
        parse=optional_str,
    )  # fmt: skip
    explore: float = option(
        0.2, "exploration weight of the bandit's upper confidence bound (0: none)", minimum=0.0
    )
    memory: float = option(
        0.98,
        "weight the record keeps per step (0.98: the last ~50 steps count most)",
        minimum=0.5,
    )
    remember: bool = option(
        True, "keep the record across requests and processes, in the cache (per model and machine)"
    )

    def check(self) -> None:
        for quant in (self.draft_quant or "").split(","):
            if quant.strip() not in ("", *DRAFT_QUANTS):
                raise InvalidRequestError(
                    f"option draft_quant of method 'auto' takes {', '.join(DRAFT_QUANTS)} "
                    f"(comma-separated), got {quant.strip()!r}"
                )
        if self.memory > 1.0:
            raise InvalidRequestError(
                f"option memory of method 'auto' must be <= 1, got {self.memory}"
            )


@dataclass
class Arm:
    """One drafter auto may run, by label (``draft:qwen2.5-coder-0.5b:int4``)."""

    label: str
    drafter: Drafter
    peek: bool  # model-free: proposes every step, to learn whether it has anything


@dataclass
class ArmUsage:
    """What an arm did in one request."""

    steps: int = 0
    tokens: int = 0  # committed, the bonus token included
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return with_rates(dataclasses.asdict(self))


def with_rates(use: dict[str, Any]) -> dict[str, Any]:
    """An arm's sums (`ArmUsage`, or several added up) with what they make: tokens per
    step (tau) and tokens per second of its steps."""
    steps, tokens, seconds = use["steps"], use["tokens"], use["seconds"]
    return {
        **use,
        "seconds": round(seconds, 6),
        "tau": round(tokens / steps, 4) if steps else 0.0,
        "tokens_per_s": round(tokens / seconds, 3) if seconds > 0 else 0.0,
    }


def situation(tree: DraftTree) -> str:
    """What a peeked tree says of its step: its size, in powers of two."""
    n = len(tree)
    return "1" if n < 2 else "2-3" if n < 4 else "4-7" if n < 8 else "8+"


def models_of_the_vocabulary(ctx: BuildContext) -> list[str]:
    """Known models present in the cache that may draft for the target: smaller than it,
    of its tokenizer (loading one that is not raises, and it is skipped)."""
    from specdec.models.catalog import KNOWN_MODELS, local_path

    target = KNOWN_MODELS.get(ctx.model)
    out = []
    for name, known in KNOWN_MODELS.items():
        if name == ctx.model or local_path(name) is None:
            continue
        if target is not None and (
            known.size >= target.size or known.architecture != target.architecture
        ):
            continue
        out.append(name)
    return out


class AutoDrafter(Drafter):
    name = "auto"
    description = (
        "each step the drafter with the best measured committed tokens per second here "
        "(prompt lookup, the n-gram cache, draft models in the cache, plain decoding), "
        "chosen by a discounted-UCB bandit per situation and kept across requests"
    )
    Options = AutoOptions

    def __init__(
        self,
        arms: list[Arm],
        explore: float = 0.2,
        memory: float = 0.98,
        identity: str | None = None,
    ) -> None:
        """``arms`` to choose among (plain decoding is added); ``identity``: the target's
        (`BuildContext.identity`), whose record in the cache keeps what was learnt (None:
        nothing kept)."""
        if any(a.label == "ar" for a in arms):
            raise InvalidRequestError("auto: plain decoding is always an arm; do not list ar")
        self.arms = {a.label: a for a in arms}
        self.arms["ar"] = Arm("ar", NoDrafter(), peek=False)
        self.bandits = {mode: StepBandit(explore, memory) for mode in ("greedy", "sampled")}
        self.identity = identity
        self.record = record_path(identity) if identity else None
        self.clock: Callable[[], float] | None = None  # None: the request's (`DraftState`)
        self.usage: dict[str, ArmUsage] = {}
        self._step: tuple | None = None  # (arm, situation, start, clock)
        self._prepared: set[str] = set()  # model arms that have read this request's prompt
        # model arm -> (tokens, seconds) it took to read prompts: its cost per prompt token
        self.catch_up: dict[str, tuple[float, float]] = {}
        if self.record is not None:
            self._load()

    @classmethod
    def build(cls, ctx: BuildContext, options: AutoOptions) -> AutoDrafter:
        from specdec.speculation.methods import get_method

        o = options
        names = [n.strip() for n in o.drafters.split(",") if n.strip()]
        if not names:
            raise InvalidRequestError("auto: option drafters names no method")
        if o.draft_model and "draft" not in names:
            names.append("draft")  # a draft model named is a draft model to choose
        arms: list[Arm] = []
        for name in dict.fromkeys(names):
            if name == "ar":
                continue
            if name == "auto":
                raise InvalidRequestError("auto cannot choose among autos")
            if name == "draft":
                arms += cls._draft_arms(ctx, o)
                continue
            if name == "eagle":
                shape = o.tree or ("dynamic" if ctx.pass_cost is not None else "none")
                given = {"num_draft_tokens": o.num_draft_tokens, "tree": shape}
                try:
                    drafter = get_method("eagle").build(ctx, given)
                except InvalidRequestError:
                    continue  # no head trained for this model, or a target without features
                arms.append(Arm(name, drafter, peek=False))
                continue
            drafter = get_method(name).build(ctx, {})
            arms.append(Arm(name, drafter, peek=not drafter.runs_a_model))
        for arm in arms:  # each step's tree goes to the engine's lossless verifier
            if any(arm.drafter.verifier(s) for s in (SamplingParams(), SamplingParams(1.0))):
                raise InvalidRequestError(f"auto: {arm.label} needs a verifier of its own")
        return cls(arms, o.explore, o.memory, ctx.identity if o.remember else None)

    @staticmethod
    def _draft_arms(ctx: BuildContext, o: AutoOptions) -> list[Arm]:
        from specdec.speculation.methods import get_method

        if o.draft_model:
            models = [m.strip() for m in o.draft_model.split(",") if m.strip()]
            required = True
        else:
            models, required = models_of_the_vocabulary(ctx), False
        quants = [q.strip() for q in (o.draft_quant or "").split(",") if q.strip()] or [None]
        arms = []
        for model in models:
            for quant in quants:
                given: dict[str, Any] = {
                    "draft_model": model,
                    "num_draft_tokens": o.num_draft_tokens,
                }
                if o.tree:
                    given["tree"] = o.tree
                if quant:
                    given["draft_quant"] = quant
                try:
                    drafter = get_method("draft").build(ctx, given)
                except InvalidRequestError:
                    if required:
                        raise
                    break  # not of the target's vocabulary (or not loadable here): skip it
                label = ":".join(["draft", model] + ([quant] if quant else []))
                arms.append(Arm(label, drafter, peek=False))
        return arms

    def share_memory(self, other: AutoDrafter) -> None:
        """The bandits' statistics and the prompt-reading costs, and each arm's memory
        with the same arm's of ``other``."""
        self.bandits, self.catch_up = other.bandits, other.catch_up
        for label, arm in self.arms.items():
            if label in other.arms:
                arm.drafter.share_memory(other.arms[label].drafter)

    # ------------------------------------------------------------------ a request
    def reset(self, prompt_ids: list[int]) -> None:
        self.usage = {}
        self._step = None
        self._prepared = set()
        for arm in self.arms.values():
            arm.drafter.reset(prompt_ids)

    def prompt_rows(self, prompt_ids: list[int]) -> list[int]:
        return sorted({r for a in self.arms.values() for r in a.drafter.prompt_rows(prompt_ids)})

    def observe_prompt(self, prompt_ids: list[int], rows: list[int], logits: torch.Tensor) -> None:
        for arm in self.arms.values():
            arm.drafter.observe_prompt(prompt_ids, rows, logits)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(sorted({i for a in self.arms.values() for i in a.drafter.feature_layers}))

    def observe_features(self, hidden: torch.Tensor) -> None:
        have = self.feature_layers
        for arm in self.arms.values():  # every step: an arm not chosen cannot ask for them later
            if arm.drafter.feature_layers:
                arm.drafter.observe_features(layer_features(hidden, have, arm.drafter.feature_layers))

    def propose(self, state: DraftState) -> DraftTree:
        clock = self.clock or state.clock
        start = clock()
        bandit = self._bandit(state)
        available: dict[str, str] = {}
        trees: dict[str, DraftTree] = {}
        setup: dict[str, tuple[float, float]] = {}
        for label, arm in self.arms.items():
            if arm.peek:
                tree = arm.drafter.propose(state)
                if len(tree):
                    trees[label], available[label] = tree, situation(tree)
            elif label != "ar" and state.budget > 1:
                if state.shared and label not in self._prepared:
                    continue  # its reading the prompt would stall every request in the pass
                available[label] = ALL
                if label not in self._prepared and label in self.catch_up:
                    # it has yet to read the prompt: that cost is spread over the tokens left
                    tokens, seconds = self.catch_up[label]
                    setup[label] = (state.budget, len(state.tokens) * seconds / tokens)
        available["ar"] = ALL
        chosen = bandit.choose(available, setup)
        arm = self.arms[chosen]
        if not arm.peek and chosen != "ar" and chosen not in self._prepared:
            # reading the prompt is a cost of the request, not of the model's steps: timed
            # apart, and weighed against the tokens left when the model is next considered
            t = clock()
            arm.drafter.prepare(state.tokens[:-1])
            spent = clock() - t
            start += spent
            self._prepared.add(chosen)
            n, s = self.catch_up.get(chosen, (0.0, 0.0))
            self.catch_up[chosen] = (n + len(state.tokens) - 1, s + spent)
        tree = trees[chosen] if arm.peek else arm.drafter.propose(state)
        self._step = (chosen, available[chosen], start, clock)
        return tree

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        label, where, start, clock = self._step
        self.arms[label].drafter.observe(state, tree, outcome)
        tokens = len(outcome.path) + 1
        seconds = clock() - start
        self._bandit(state).update(label, where, tokens, seconds)
        use = self.usage.setdefault(label, ArmUsage())
        use.steps += 1
        use.tokens += tokens
        use.drafted += len(tree)
        use.accepted += len(outcome.path)
        use.seconds += seconds

    def finish(self) -> dict[str, Any] | None:
        """The request ended: keep the record, and report each arm's part in it."""
        if self.record is not None:
            self._save()
        for arm in self.arms.values():
            arm.drafter.finish()
        return {label: u.to_dict() for label, u in sorted(self.usage.items())}

    def _bandit(self, state: DraftState) -> StepBandit:
        return self.bandits["greedy" if state.sampling.greedy else "sampled"]

    # ------------------------------------------------------------------ the record
    def _load(self) -> None:
        data = read_record(self.record)
        for mode, bandit in self.bandits.items():
            bandit.load_json(data.get(mode, {}) if isinstance(data.get(mode), dict) else {})
        prompts = data.get("prompt_reading", {})
        for arm, value in (prompts.items() if isinstance(prompts, dict) else []):
            try:
                tokens, seconds = (float(v) for v in value)
            except (TypeError, ValueError):
                continue
            if tokens > 0 and seconds >= 0:
                self.catch_up[str(arm)] = (tokens, seconds)

    def _save(self) -> None:
        from specdec.models.pass_cost import machine_key

        data: dict[str, Any] = {"identity": self.identity, "machine": machine_key()}
        data.update({mode: b.to_json() for mode, b in self.bandits.items()})
        data["prompt_reading"] = {arm: list(v) for arm, v in sorted(self.catch_up.items())}
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.record)
        except OSError:
            pass  # a read-only cache costs the record, not the request


def records_dir() -> Path:
    from specdec.models.catalog import cache_dir

    return cache_dir() / "auto"


def record_path(identity: str) -> Path:
    """Where auto's record for target ``identity`` on this machine lives."""
    from specdec.models.pass_cost import machine_key

    key = hashlib.sha256(f"{identity}|{machine_key()}".encode()).hexdigest()[:16]
    name = identity.split("|", 1)[0].replace("/", "_") or "model"
    return records_dir() / f"{name}-{key}.json"


def read_record(path: Path) -> dict[str, Any]:
    """A record as saved (empty if missing or damaged: learnt afresh)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def summarise_record(data: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per sampling mode and arm, what the record holds over all situations: the weight
    of its steps (discounted), tokens per step and tokens per second."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode in ("greedy", "sampled"):
        bandit = StepBandit()
        bandit.load_json(data.get(mode, {}) if isinstance(data.get(mode), dict) else {})
        arms = {}
        for (arm, where), t in sorted(bandit.tallies.items()):
            if where == ALL and t.steps > 0:
                arms[arm] = {
                    "steps": round(t.steps, 2),
                    "tau": round(t.tokens / t.steps, 3),
                    "tokens_per_s": round(t.rate, 2),
                }
        if arms:
            out[mode] = arms
    return out
