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
pass time. A node's chance of acceptance is its share of the matches' weight
times the tokens accepted per unit of share so far at its depth after matches
of the same n-gram length (`ShareCalibration` keyed by (n, depth)), never more
than its parent's; the nodes are verified best first. A kind of match judged
worthless is still drafted (one node) now and then, so that what it is worth
can be learnt again.
"""

from __future__ import annotations

from specdec.errors import InvalidRequestError
from specdec.spec.drafters.base import Drafter, DraftState, ngram_orders
from specdec.spec.policies import ShareCalibration, best_size
from specdec.spec.tree import DraftTree
from specdec.spec.verifiers.base import Outcome


class PromptLookupDrafter(Drafter):
    name = "pld"
    EXPLORE_EVERY = 16  # a kind of match whose tree is cut to nothing still drafts once in this many

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
        self.pass_cost = pass_cost  # PassCost of the target, or None: always max_nodes
        self.calibration = ShareCalibration()
        self._skipped: dict[int, int] = {}  # n -> times its tree was cut to nothing
        self._drafted: tuple[int, list[int], list[float]] | None = None  # n, depths, shares
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
        self._drafted = None
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
            if not longest and self.index[n].get(tuple(tokens[-n:])):
                longest = n
            for end in reversed(self.index[n].get(tuple(tokens[-n:]), ())):
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
        if self.pass_cost is None:
            return DraftTree.from_paths(paths, weights, limit)
        tree, node_weights = DraftTree.weighted_trie(paths, weights, limit)
        total = sum(weights)
        shares = [w / total for w in node_weights]
        depths = tree.depths
        scores: list[float] = []
        for i, p in enumerate(tree.parents):
            s = shares[i] * self.calibration.factor((longest, depths[i]))
            scores.append(min(s, scores[p]) if p >= 0 else s)
        # best first; a child never outscores its parent and ties go to the shallower node,
        # so every prefix of this order is a tree
        order = sorted(range(len(tree)), key=lambda i: (-scores[i], depths[i], i))
        n = best_size([scores[i] for i in order], self.pass_cost)
        if n == 0:
            self._skipped[longest] = self._skipped.get(longest, 0) + 1
            if self._skipped[longest] % self.EXPLORE_EVERY == 0:
                n = 1
        keep = order[:n]
        self._drafted = (longest, [depths[i] for i in keep], [shares[i] for i in keep])
        return tree.subtree(keep)

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if self._drafted is None or not len(tree):
            return
        longest, depths, shares = self._drafted
        accepted = set(outcome.path)
        by_depth: dict[int, list[float]] = {}  # depth -> [share drafted, nodes accepted]
        for i, (d, share) in enumerate(zip(depths, shares, strict=True)):
            acc = by_depth.setdefault(d, [0.0, 0])
            acc[0] += share
            acc[1] += i in accepted
        for d, (share, hits) in by_depth.items():
            self.calibration.observe((longest, d), share, hits)
