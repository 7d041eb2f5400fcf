"""An n-gram cache across requests: what followed each n-gram in every sequence seen so far.

The idea of llama.cpp's lookup decoding (its "dynamic" n-gram cache) and of
the cross-request caches in OmniDraft and SuffixDecoding: count, for each
n-gram of ``min_ngram``..``max_ngram`` tokens, the tokens that followed it in
the prompts and outputs of all requests this drafter has served; draft by
following the most frequent next token of the longest n-gram that has been
seen often enough.

Drafting: the ``branches`` most frequent next tokens after the longest known
n-gram start the branches; each is extended greedily (longest n-gram first,
its most frequent next token, if it has at least ``min_count`` observations
and a share of at least ``min_share``) up to ``num_draft_tokens`` tokens.
Branches weigh their first token's count, and the trie is cut to
``max_nodes`` (`DraftTree.from_paths`). Nodes are deterministic: exact under
greedy and speculative sampling. Memory is bounded: past ``max_entries``
distinct n-grams, new ones are no longer added (existing counts still grow).

Given the target's pass-cost curve, the trie is cut to the size that pays
(`TrieSizer`): a node's chance of acceptance is its branch's share of the
counts times the tokens accepted per unit of share so far at its depth after
matches of the same n-gram length, learnt online.
"""

from __future__ import annotations

from collections import Counter

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import Drafter, DraftState, ngram_orders
from specdec.speculation.sizing import TrieSizer
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome


class NgramCacheDrafter(Drafter):
    name = "ngram-cache"

    def __init__(
        self,
        num_draft_tokens: int = 8,
        min_ngram: int = 1,
        max_ngram: int = 4,
        branches: int = 2,
        max_nodes: int = 16,
        min_count: int = 1,
        min_share: float = 0.3,
        max_entries: int = 2_000_000,
        pass_cost=None,
    ) -> None:
        if min(num_draft_tokens, branches, max_nodes, min_count) < 1:
            raise InvalidRequestError(
                "num_draft_tokens, branches, max_nodes and min_count must be >= 1"
            )
        self.k = num_draft_tokens
        self.ngrams = ngram_orders(min_ngram, max_ngram)
        self.branches = branches
        self.max_nodes = max_nodes
        self.min_count = min_count
        self.min_share = min_share
        self.max_entries = max_entries
        # given the target's PassCost, trees are cut to what pays; else always max_nodes
        self.sizer = TrieSizer(pass_cost) if pass_cost is not None else None
        self.next: dict[tuple[int, ...], Counter[int]] = {}  # n-gram -> next-token counts
        self.counted = 0  # positions of the current sequence already counted

    def reset(self, prompt_ids: list[int]) -> None:
        self.counted = 0  # the counts stay: they are the cache across requests

    def _count(self, tokens: list[int]) -> None:
        for end in range(max(self.counted, 1), len(tokens)):
            nxt = tokens[end]
            for n in self.ngrams:
                if end < n:
                    continue
                key = tuple(tokens[end - n : end])
                c = self.next.get(key)
                if c is None:
                    if len(self.next) >= self.max_entries:
                        continue
                    c = self.next[key] = Counter()
                c[nxt] += 1
        self.counted = max(self.counted, len(tokens))

    def _candidates(self, context: list[int]) -> tuple[int, Counter[int] | None]:
        """The longest known n-gram ending the context: (n, its next-token counts)."""
        for n in self.ngrams:
            if len(context) >= n:
                c = self.next.get(tuple(context[-n:]))
                if c:
                    return n, c
        return 0, None

    def _confident(self, c: Counter[int]) -> int | None:
        token, count = c.most_common(1)[0]
        if count >= self.min_count and count >= self.min_share * c.total():
            return token
        return None

    def propose(self, state: DraftState) -> DraftTree:
        if self.sizer:
            self.sizer.forget()
        tokens = state.tokens
        self._count(tokens)
        k = min(self.k, state.budget)
        matched, first = self._candidates(tokens) if k > 0 else (0, None)
        if not first:
            return DraftTree()
        tail = tokens[-max(self.ngrams) :]
        paths, weights = [], []
        for token, count in first.most_common(self.branches):
            if count < self.min_count:
                break
            path = [token]
            while len(path) < k:
                c = self._candidates(tail + path)[1]
                nxt = self._confident(c) if c else None
                if nxt is None:
                    break
                path.append(nxt)
            paths.append(path)
            weights.append(float(count))
        if not paths:
            return DraftTree()
        limit = min(self.max_nodes, state.budget)
        if self.sizer is None:
            return DraftTree.from_paths(paths, weights, limit)
        tree, node_weights = DraftTree.weighted_trie(paths, weights, limit)
        total = first.total()  # a branch's share: its first token's share of the counts
        return self.sizer.cut(tree, [w / total for w in node_weights], matched)

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if self.sizer:
            self.sizer.observe(outcome.path)

    def node_scores(self) -> list[float] | None:
        return self.sizer.scores if self.sizer else None

    def keep_only(self, nodes: list[int]) -> None:
        self.sizer.keep_only(nodes)
