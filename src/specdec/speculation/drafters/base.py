"""The drafter interface: propose a tree of guesses, learn from what was accepted.

A drafting method is one `Drafter` subclass in one file: its ``name`` and
``description``, its options (an `Options` dataclass beside the code) and a
``build(ctx, options)`` that makes it from a `BuildContext`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.models.pass_cost import PassCost
from specdec.models.target import Target
from specdec.models.tokenizer import Tokenizer
from specdec.speculation.options import Options
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.sizing import TrieSizer
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier


@dataclass
class DraftState:
    """What a drafter may look at when it proposes.

    ``tokens`` is the prompt followed by every token committed so far; its last
    token is the root of the next tree (committed, not yet run through the target).
    """

    tokens: list[int]
    prompt_len: int
    sampling: SamplingParams
    rng: torch.Generator | None
    budget: int  # most nodes worth drafting (tokens left to generate, tree limits)
    # the request's clock, in seconds: the wall clock alone; in a batch, each shared pass
    # counts what this request's rows would cost alone (what a drafter learns from timing
    # stays what it would learn alone, whatever else runs beside it)
    clock: Callable[[], float] = time.perf_counter
    # other requests share this step's pass: work that stalls it (a draft model reading a
    # whole prompt) stalls them all
    shared: bool = False


@dataclass(frozen=True)
class BuildContext:
    """What a method's ``build`` may use: the target's facts and what can be loaded for it.

    ``load_draft(spec)`` loads a draft model of the target's tokenizer once per target
    (a `Target`); ``load_draft(spec, same_tokenizer=False)`` one of any tokenizer, as
    ``(target, tokenizer)``; ``quant=`` a weight format of the draft's own. ``pass_cost()``
    is the target's measured pass-cost curve (measured once per machine, then cached) and
    ``draft_pass_cost(spec)`` a draft's; None where they cannot be measured (trees are
    then not cut by cost). ``model`` is the target's name, ``identity`` names the target as measurements depend on it
    (model, file, weights, device), for what a method learns and keeps in the cache.
    """

    tokenizer: Tokenizer
    vocab_size: int
    target: Target | None = None
    load_draft: Callable[..., Any] | None = None
    pass_cost: Callable[[], PassCost] | None = None
    draft_pass_cost: Callable[..., PassCost] | None = None
    progress: bool = False
    model: str = ""
    identity: str = ""

    def cost_if(self, wanted: bool) -> PassCost | None:
        """The target's pass-cost curve if ``wanted`` and measurable, else None."""
        return self.pass_cost() if wanted and self.pass_cost is not None else None

    def draft(self, spec: str | None, method: str, **kwargs: Any) -> Any:
        """``load_draft(spec)``, with a clear error if no draft model was named."""
        if not spec:
            raise InvalidRequestError(f"method {method!r} needs a draft model: --draft MODEL")
        if self.load_draft is None:
            raise InvalidRequestError(f"method {method!r}: no draft models can be loaded here")
        return self.load_draft(spec, **kwargs)


def ngram_orders(min_ngram: int, max_ngram: int) -> range:
    """The n-gram sizes an n-gram drafter looks up, longest first (validated)."""
    if not 1 <= min_ngram <= max_ngram:
        raise InvalidRequestError(
            f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
        )
    return range(max_ngram, min_ngram - 1, -1)


def unseen_token_rows(prompt_ids: list[int], unseen: list[bool], limit: int) -> list[int]:
    """Prompt positions to learn from: the last occurrence of each token marked ``unseen``,
    the tokens most frequent in the prompt first (likeliest to come back), at most ``limit``."""
    last: dict[int, int] = {}
    count: dict[int, int] = {}
    for i, (token, new) in enumerate(zip(prompt_ids, unseen, strict=True)):
        if new:
            last[token] = i
            count[token] = count.get(token, 0) + 1
    ranked = sorted(last, key=lambda t: (-count[t], -last[t]))
    return [last[t] for t in ranked[:limit]]


class Drafter:
    """Proposes a tree of guesses each step and learns from what the target kept.

    The core, which every drafter has: `reset` (a new request), `propose` (the tree
    for this step) and `observe` (what the target kept of it). Optional capabilities,
    with defaults that do nothing: `prompt_rows` / `observe_prompt` (learn from the
    prefill's logits), `node_scores` / `keep_only` (let a merge size the union of
    several trees), `verifier` (trees that need a particular verifier).

    As a method: ``name``, ``description``, ``lossless``, ``Options`` (the options a
    user can set, with defaults and checks) and `build`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    lossy_with: ClassVar[str] = ""  # the options that make it lossy (`Options.lossless`)
    runs_a_model: ClassVar[bool] = False  # drafts with a model of its own (costly to ask)
    Options: ClassVar[type[Options]] = Options

    @classmethod
    def build(cls, ctx: BuildContext, options: Options) -> Drafter:
        """The drafter for ``options`` (checked, defaults filled in) on ``ctx``'s target."""
        return cls()

    def reset(self, prompt_ids: list[int]) -> None:
        """A new request starts."""

    def prompt_rows(self, prompt_ids: list[int]) -> list[int]:
        """Prompt positions whose target logits this drafter wants from the prefill (asked
        before `reset`). Each row costs the target's LM head once (about 2 ms at the 1.5B
        in bfloat16), charged to the prefill; the last position's row comes free."""
        return []

    def observe_prompt(self, prompt_ids: list[int], rows: list[int], logits: torch.Tensor) -> None:
        """After `reset`: the prefill's logits at prompt positions ``rows`` (what was asked,
        plus the last position), one row of ``logits`` each."""

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The target's hidden states this drafter reads (`observe_features`), by layer id:
        id i is the residual stream entering layer i, id num_layers the last layer's output
        before the final norm. Empty: none. The engine asks the target for them only then
        (a target may refuse: llama.cpp)."""
        return ()

    def observe_features(self, hidden: torch.Tensor) -> None:
        """The target's hidden states at `feature_layers`, side by side (rows of
        len(feature_layers) * hidden), at the positions just committed to its cache, in
        order: the whole prompt after the prefill (after `observe_prompt`), then each step's
        root and accepted nodes (before `observe`). Only called when `feature_layers`."""

    def propose(self, state: DraftState) -> DraftTree:
        raise NotImplementedError

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        """The target verified ``tree``; ``outcome`` says what it kept."""

    def node_scores(self) -> list[float] | None:
        """After `propose`: each node's chance of being accepted (the tokens it adds in
        expectation; never more than its parent's; ``inf`` for a node that must be verified,
        e.g. one drafted to learn what it is worth), so that a merge can size the union of
        several drafters' trees jointly. None (the default): unknown, and a merge keeps the
        whole tree. A drafter that gives scores must take `keep_only`."""
        return None

    def keep_only(self, nodes: list[int]) -> None:
        """After `propose` and `node_scores`: only ``nodes`` of the proposed tree (ascending,
        each with its parent) are verified, so the next `observe` gets
        ``tree.subtree(nodes)`` and a path in its indices; learn only from those."""
        raise NotImplementedError(f"{self.name} gives node scores but cannot keep a subtree")

    def verifier(self, sampling: SamplingParams) -> Verifier | None:
        """The verifier this drafter's trees need under ``sampling`` (e.g. SpecTr for i.i.d.
        siblings); None leaves the choice to the engine (greedy or speculative sampling)."""
        return None

    def prepare(self, tokens: list[int]) -> None:
        """Catch up on ``tokens`` (the sequence so far, less its last token) before a
        `propose`, so that the proposal costs one step's work: a draft model runs what
        it has not seen. Nothing for drafters without such state."""

    def finish(self) -> dict[str, Any] | None:
        """The request ended (also when cut short): keep what must be kept, and say what
        each part of the drafter did, for the request's stats (None: nothing to say)."""
        return None

    def share_memory(self, other: Drafter) -> None:
        """From now on learn into ``other``'s memory: what this drafter keeps across
        requests (counts, matrices, acceptance statistics) becomes the very objects
        ``other`` keeps, so that what either learns serves both. ``other`` is a drafter
        of the same method and options. What belongs to one request (its position, this
        step's tree) stays each drafter's own, so two drafters sharing their memory may
        serve two requests at once, stepped from one thread. Drafters that keep nothing
        across requests: nothing to do."""


class TrieDrafter(Drafter):
    """A drafter of deterministic proposals (prompt lookup, an n-gram cache, retrieval)
    merged into one weighted trie. Given the target's pass-cost curve the trie is cut
    to what pays (`TrieSizer`), and its nodes' chances let a merge size it jointly;
    without one it keeps its heaviest ``limit`` nodes."""

    def __init__(self, pass_cost: PassCost | None = None, by_depth: bool = True) -> None:
        """``by_depth``: learn a node's chance per (kind of proposal, depth), or per kind."""
        self.sizer = TrieSizer(pass_cost, by_depth) if pass_cost is not None else None

    def start_step(self) -> None:
        """Call first in `propose`: nothing is drafted through the sizer yet."""
        if self.sizer is not None:
            self.sizer.forget()

    def trie(
        self,
        paths: list[list[int]],
        weights: list[float],
        limit: int,
        key: object,
        total: float | None = None,
        explore: bool = False,
    ) -> DraftTree:
        """The trie of ``paths`` (heaviest ``limit`` nodes), cut by the sizer: a node's
        share is its weight over ``total`` (default: the sum of ``weights``), its chance
        learnt per kind of proposal ``key`` (`TrieSizer.cut`)."""
        tree, node_weights = DraftTree.weighted_trie(paths, weights, limit)
        if self.sizer is None:
            return tree
        total = total or sum(weights)
        return self.sizer.cut(tree, [w / total for w in node_weights], key, explore)

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if self.sizer is not None:
            self.sizer.observe(outcome.path)

    def node_scores(self) -> list[float] | None:
        return self.sizer.scores if self.sizer is not None else None

    def keep_only(self, nodes: list[int]) -> None:
        self.sizer.keep_only(nodes)


@dataclass(frozen=True)
class NoOptions(Options):
    method: ClassVar[str] = "ar"


class NoDrafter(Drafter):
    """Autoregressive decoding: nothing drafted, one token per target pass."""

    name = "ar"
    Options = NoOptions
    description = "plain autoregressive decoding: one token per target pass (the baseline)"

    def propose(self, state: DraftState) -> DraftTree:
        return DraftTree()


def layer_features(hidden: torch.Tensor, have: tuple[int, ...], want: tuple[int, ...]):
    """The columns of ``want``'s layers in ``hidden`` (rows of ``have``'s layers side by
    side), side by side in ``want``'s order."""
    if have == want:
        return hidden
    d = hidden.shape[1] // len(have)
    return torch.cat([hidden[:, have.index(i) * d : (have.index(i) + 1) * d] for i in want], 1)
