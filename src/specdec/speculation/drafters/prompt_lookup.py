"""Prompt lookup decoding: copy what followed the last n-gram where it appeared before.

Saxena 2023, "Prompt Lookup Decoding" (the method behind `transformers`'
``prompt_lookup_num_tokens`` and llama.cpp's lookup): find the last ``n``
tokens of the sequence (prompt and generated text) earlier in the sequence,
longest ``n`` first, and propose the tokens that followed there.

Deviation from the original, which proposes one continuation (the first
match): up to ``branches`` different matches become one trie, weighted by
match length (a longer n-gram counts ``2**n``) and by how many matches agree,
pruned to ``max_nodes`` nodes (`DraftTree.from_paths`); a single match is
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

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import Drafter, DraftState, ngram_orders
from specdec.speculation.sizing import TrieSizer
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome


class PromptLookupDrafter(Drafter):
    name = "pld"

    def __init__(
        self,
        num_draft_tokens: int = 10,
        min_ngram: int = 1,
        max_ngram: int = 3,
        branches: int = 3,
        max_nodes: int = 16,
        pass_cost=None,
    ) -> None:
        if min(num_draft_tokens, branches, max_nodes) < 1:
            raise InvalidRequestError("num_draft_tokens, branches and max_nodes must be >= 1")
        self.k = num_draft_tokens
        self.ngrams = ngram_orders(min_ngram, max_ngram)
        self.branches = branches
        self.max_nodes = max_nodes
        # given the target's PassCost, trees are cut to what pays; else always max_nodes
        self.sizer = TrieSizer(pass_cost) if pass_cost is not None else None
        self.reset([])

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
        if self.sizer:
            self.sizer.forget()
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
        limit = min(self.max_nodes, state.budget)
        if self.sizer is None:
            return DraftTree.from_paths(paths, weights, limit)
        tree, node_weights = DraftTree.weighted_trie(paths, weights, limit)
        total = sum(weights)
        return self.sizer.cut(tree, [w / total for w in node_weights], longest)

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if self.sizer:
            self.sizer.observe(outcome.path)

    def node_scores(self) -> list[float] | None:
        return self.sizer.scores if self.sizer else None

    def keep_only(self, nodes: list[int]) -> None:
        self.sizer.keep_only(nodes)
