"""Prompt lookup decoding: copy what followed the last n-gram where it appeared before.

Saxena 2023, "Prompt Lookup Decoding" (the method behind `transformers`'
``prompt_lookup_num_tokens`` and llama.cpp's lookup): find the last ``n``
tokens of the sequence (prompt and generated text) earlier in the sequence,
longest ``n`` first, and propose the tokens that followed there.

Deviation from the original, which proposes one continuation (the first
match): up to ``branches`` different matches become one trie, weighted by
match length (a longer n-gram counts ``2**n``) and by how many matches agree,
pruned to ``max_nodes`` nodes (`TrieDrafter.trie`); a single match is
the original chain. The n-gram index is updated incrementally as tokens are
committed, so a step costs a few dictionary lookups, not a scan of the text.
Every node is a deterministic proposal (``q`` None): exact under greedy and
under speculative sampling alike.

Second deviation, for targets whose pass grows with its tokens (a quantised
CPU target: a pass over 8 tokens costs ~1.7x one): given the target's pass-cost
curve, the tree is cut to the size that maximises expected tokens per unit of
pass time (`TrieSizer`): a node's chance of acceptance is its share of the
matches' weight times the tokens accepted per unit of share so far at its
depth after matches of the same n-gram length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from specdec.speculation.drafters.base import BuildContext, DraftState, TrieDrafter, ngram_orders
from specdec.speculation.options import SIZE_BY_COST_HELP, Options, option
from specdec.speculation.tree import DraftTree


@dataclass(frozen=True)
class PromptLookupOptions(Options):
    method: ClassVar[str] = "pld"
    num_draft_tokens: int = option(10, "tokens copied per match", minimum=1)
    min_ngram: int = option(1, "shortest n-gram matched", minimum=1)
    max_ngram: int = option(3, "longest n-gram matched (tried first)", minimum=1)
    branches: int = option(3, "most matches merged into the tree", minimum=1)
    max_nodes: int = option(16, "most tree nodes verified in one pass", minimum=1)
    size_by_cost: bool = option(True, SIZE_BY_COST_HELP)

    def check(self) -> None:
        ngram_orders(self.min_ngram, self.max_ngram)


class PromptLookupDrafter(TrieDrafter):
    name = "pld"
    description = (
        "prompt lookup decoding: the last n-gram's earlier occurrences in the prompt and "
        "output propose what followed them, several matches as one tree (Saxena 2023)"
    )
    Options = PromptLookupOptions

    def __init__(
        self, options: PromptLookupOptions | None = None, pass_cost=None, **given
    ) -> None:
        """``options``, or the options as keywords; ``pass_cost``: the target's `PassCost`."""
        o = PromptLookupOptions.of(options, given)
        self.k = o.num_draft_tokens
        self.ngrams = ngram_orders(o.min_ngram, o.max_ngram)
        self.branches = o.branches
        self.max_nodes = o.max_nodes
        super().__init__(pass_cost)  # trees cut to what pays; without a cost, max_nodes
        self.reset([])

    @classmethod
    def build(cls, ctx: BuildContext, options: PromptLookupOptions) -> PromptLookupDrafter:
        return cls(options, pass_cost=ctx.cost_if(options.size_by_cost))

    def reset(self, prompt_ids: list[int]) -> None:
        # n -> n-gram -> positions right after each of its occurrences (oldest first)
        self.index: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.ngrams}
        self.indexed = 1  # occurrences ending before this position are indexed

    def _index(self, tokens: list[int]) -> None:
        # The sequence only grows within a request (the engine resets between requests).
        # Only n-grams with at least one token after them: the continuation is non-empty.
        for end in range(self.indexed, len(tokens)):
            for n in self.ngrams:
                if end >= n:
                    self.index[n].setdefault(tuple(tokens[end - n : end]), []).append(end)
        self.indexed = max(len(tokens), self.indexed)

    def propose(self, state: DraftState) -> DraftTree:
        self.start_step()
        tokens = state.tokens
        self._index(tokens)
        k = min(self.k, state.budget)
        if k <= 0:
            return DraftTree()
        paths: list[list[int]] = []
        weights: list[float] = []
        used: set[int] = set()  # a match of n tokens is also one of every shorter n-gram
        longest = 0
        for n in self.ngrams:
            if len(tokens) < n:
                continue
            ends = self.index[n].get(tuple(tokens[-n:]), ())
            if ends and not longest:
                longest = n
            for end in reversed(ends):
                if end in used:
                    continue
                used.add(end)
                path = tokens[end : end + k]
                if path in paths:
                    weights[paths.index(path)] += 2.0**n
                    continue
                if len(paths) == self.branches:
                    break
                paths.append(path)
                weights.append(2.0**n)
            if len(paths) == self.branches:
                break
        if not paths:
            return DraftTree()
        return self.trie(paths, weights, min(self.max_nodes, state.budget), key=longest)
