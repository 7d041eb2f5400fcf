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
``max_nodes`` (`TrieDrafter.trie`). Nodes are deterministic: exact under
greedy and speculative sampling. Memory is bounded: past ``max_entries``
distinct n-grams, new ones are no longer added (existing counts still grow).

Given the target's pass-cost curve, the trie is cut to the size that pays
(`TrieSizer`): a node's chance of acceptance is its branch's share of the
counts times the tokens accepted per unit of share so far at its depth after
matches of the same n-gram length, learnt online.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from specdec.speculation.drafters.base import BuildContext, DraftState, TrieDrafter, ngram_orders
from specdec.speculation.options import SIZE_BY_COST_HELP, Options, option
from specdec.speculation.tree import DraftTree


@dataclass(frozen=True)
class NgramCacheOptions(Options):
    method: ClassVar[str] = "ngram-cache"
    num_draft_tokens: int = option(8, "most tokens per branch", minimum=1)
    min_ngram: int = option(1, "shortest n-gram looked up", minimum=1)
    max_ngram: int = option(4, "longest n-gram looked up (tried first)", minimum=1)
    branches: int = option(2, "next tokens tried at the first level", minimum=1)
    max_nodes: int = option(16, "most tree nodes verified in one pass", minimum=1)
    min_count: int = option(1, "observations needed to extend a branch", minimum=1)
    min_share: float = option(0.3, "share of the n-gram's observations needed to extend", minimum=0)
    max_entries: int = option(2_000_000, "most n-grams kept", minimum=1)
    size_by_cost: bool = option(True, SIZE_BY_COST_HELP)

    def check(self) -> None:
        ngram_orders(self.min_ngram, self.max_ngram)


class NgramCacheDrafter(TrieDrafter):
    name = "ngram-cache"
    description = (
        "an n-gram cache across requests: the most frequent continuations of the longest "
        "n-gram seen in earlier prompts and outputs (llama.cpp's lookup cache, OmniDraft)"
    )
    Options = NgramCacheOptions

    def __init__(self, options: NgramCacheOptions | None = None, pass_cost=None, **given) -> None:
        """``options``, or the options as keywords; ``pass_cost``: the target's `PassCost`."""
        o = NgramCacheOptions.of(options, given)
        self.k = o.num_draft_tokens
        self.ngrams = ngram_orders(o.min_ngram, o.max_ngram)
        self.branches = o.branches
        self.max_nodes = o.max_nodes
        self.min_count = o.min_count
        self.min_share = o.min_share
        self.max_entries = o.max_entries
        super().__init__(pass_cost)  # trees cut to what pays; without a cost, max_nodes
        self.next: dict[tuple[int, ...], Counter[int]] = {}  # n-gram -> next-token counts
        self.counted = 0  # positions of the current sequence already counted

    @classmethod
    def build(cls, ctx: BuildContext, options: NgramCacheOptions) -> NgramCacheDrafter:
        return cls(options, pass_cost=ctx.cost_if(options.size_by_cost))

    def share_memory(self, other: NgramCacheDrafter) -> None:
        self.next = other.next  # the counts; the trie sizer's step state stays per drafter

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
        self.start_step()
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
        # a branch's share: its first token's share of the counts
        limit = min(self.max_nodes, state.budget)
        return self.trie(paths, weights, limit, key=matched, total=first.total())
