"""The drafter interface: propose a tree of guesses, learn from what was accepted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.speculation.sampling import SamplingParams
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


def ngram_orders(min_ngram: int, max_ngram: int) -> range:
    """The n-gram sizes an n-gram drafter looks up, longest first (validated)."""
    if not 1 <= min_ngram <= max_ngram:
        from specdec.errors import InvalidRequestError

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
    name: str = ""
    #: what the method needs beyond tokens and logits: "draft_model", "hidden_states", ...
    needs: frozenset[str] = frozenset()

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


class NoDrafter(Drafter):
    """Autoregressive decoding: nothing drafted, one token per target pass."""

    name = "ar"

    def propose(self, state: DraftState) -> DraftTree:
        return DraftTree()
