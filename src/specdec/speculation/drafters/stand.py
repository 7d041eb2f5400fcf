"""STAND: an n-gram model of the target's own distributions, drafted stochastically.

Song et al. 2025, "Accelerated Test-Time Scaling with Model-Free Speculative
Sampling" (STochastic Adaptive N-gram Drafting). For every n-gram of the
sequences it has verified (n = ``max_ngram`` down to ``min_ngram``) the
drafter keeps the target's top-``top_k`` next tokens with their
probabilities, as the running mean of every distribution the target produced
after that n-gram (a recurring n-gram's entry is averaged, not overwritten,
and cut back to the top ``top_k``). A node's children come from the entry of
the longest n-gram ending at it: under sampling, drawn without replacement
with the Gumbel-Top-k trick from the entry renormalised, each carrying as its
``q`` the entry with the earlier siblings removed (RSD-C; exact under the
recursive rejection sampler, `specdec.speculation.verifiers.speculative`); under
greedy decoding, the entry's most probable tokens.

The tree shape: the paper fits a static 80-node tree offline (from 30 AIME
problems, the most accepted nodes of a 625-node tree). Deviation: the shape
here is learnt online the same way — the most accepted (depth, rank) slots
(`RankAcceptance`) — and sized with the target's measured pass-cost curve
(a pass over 80 tokens is far from free on a CPU). The shape is fixed before
any token is drawn; a slot whose parent's n-gram has no entry, or fewer
tokens than its rank, stays empty with its subtree. So whether a sibling
exists never depends on its own token, which the without-replacement rule
requires. Every verified row (accepted or not) updates the model, as in
Token Recycling; the paper does not say which rows it records. As in
`token_recycling`, the prefill also gives the target's distributions at up
to ``prompt_rows`` prompt places (a deviation: the paper learns from
verification only). Stored
probabilities are what the target samples from: the distribution shaped by
the request's temperature, top-k and top-p (tokens they rule out are not
stored), so a draft drawn from them is accepted as often as the target's
own shaping allows; under greedy decoding, where only the ranking matters,
the softmax at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.speculation.drafters.base import (
    BuildContext,
    Drafter,
    DraftState,
    ngram_orders,
    unseen_token_rows,
)
from specdec.speculation.options import PROMPT_ROWS_HELP, SIZE_BY_COST_HELP, Options, option
from specdec.speculation.sampling import SamplingParams, probabilities
from specdec.speculation.sizing import RankAcceptance, best_size
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome
from specdec.speculation.without_replacement import conditionals, gumbel


class _Entry:
    __slots__ = ("ids", "probs", "count")

    def __init__(self, ids: list[int], probs: list[float]) -> None:
        self.ids, self.probs, self.count = ids, probs, 1


@dataclass(frozen=True)
class StandOptions(Options):
    method: ClassVar[str] = "stand"
    top_k: int = option(10, "tokens kept per n-gram", minimum=1)
    min_ngram: int = option(1, "shortest n-gram looked up", minimum=1)
    max_ngram: int = option(4, "longest n-gram looked up (tried first)", minimum=1)
    max_nodes: int = option(24, "most tree nodes verified in one pass", minimum=1)
    max_depth: int = option(8, "deepest tree level", minimum=1)
    size_by_cost: bool = option(True, SIZE_BY_COST_HELP)
    max_entries: int = option(2_000_000, "most n-grams kept", minimum=1)
    prompt_rows: int = option(128, PROMPT_ROWS_HELP, minimum=0)

    def check(self) -> None:
        ngram_orders(self.min_ngram, self.max_ngram)


class StandDrafter(Drafter):
    name = "stand"
    description = (
        "STAND: an n-gram model of the target's own top-10 distributions (running means), "
        "drafted stochastically without replacement (Gumbel-Top-k) in a tree whose shape "
        "is learnt from acceptance (Song et al. 2025)"
    )
    Options = StandOptions

    def __init__(
        self, vocab_size: int, options: StandOptions | None = None, pass_cost=None, **given
    ) -> None:
        """``options``, or the options as keywords; ``pass_cost``: the target's `PassCost`."""
        o = StandOptions.of(options, given)
        self.vocab_size = vocab_size
        self.top_k = o.top_k
        self.ngrams = ngram_orders(o.min_ngram, o.max_ngram)
        self.max_nodes = o.max_nodes
        self.pass_cost = pass_cost
        self.max_entries = o.max_entries
        self.max_prompt_rows = o.prompt_rows
        self.memory: dict[tuple[int, ...], _Entry] = {}
        self.acceptance = RankAcceptance(o.max_depth, o.top_k)
        self._ranks: list[int] = []

    @classmethod
    def build(cls, ctx: BuildContext, options: StandOptions) -> StandDrafter:
        return cls(ctx.vocab_size, options, pass_cost=ctx.cost_if(options.size_by_cost))

    def share_memory(self, other: StandDrafter) -> None:
        self.memory, self.acceptance = other.memory, other.acceptance

    def _entry(self, context: list[int]) -> _Entry | None:
        for n in self.ngrams:
            if len(context) >= n:
                e = self.memory.get(tuple(context[-n:]))
                if e is not None:
                    return e
        return None

    def _record(self, context: list[int], ids: list[int], probs: list[float]) -> None:
        for n in self.ngrams:
            if len(context) < n:
                continue
            key = tuple(context[-n:])
            e = self.memory.get(key)
            if e is None:
                if len(self.memory) < self.max_entries:
                    self.memory[key] = _Entry(list(ids), list(probs))
                continue
            # running mean over every observation; a token missing from one counts as 0
            c = e.count
            merged = {t: p * c / (c + 1) for t, p in zip(e.ids, e.probs, strict=True)}
            for t, p in zip(ids, probs, strict=True):
                merged[t] = merged.get(t, 0.0) + p / (c + 1)
            best = sorted(merged.items(), key=lambda tp: -tp[1])[: self.top_k]
            e.ids, e.probs, e.count = [t for t, _ in best], [p for _, p in best], c + 1

    def _children(
        self, entry: _Entry, m: int, state: DraftState
    ) -> list[tuple[int, torch.Tensor | None]]:
        """``m`` children (fewer if the entry holds fewer tokens) and the q of each."""
        m = min(m, len(entry.ids))
        if state.sampling.greedy:
            return [(t, None) for t in entry.ids[:m]]
        p = torch.tensor(entry.probs, dtype=torch.float64)
        keys = p.log() + gumbel(p.shape, "cpu", state.rng)
        order = keys.argsort(descending=True)[:m].tolist()
        tokens = [entry.ids[i] for i in order]
        q = torch.zeros(self.vocab_size, dtype=torch.float64)
        q[torch.tensor(entry.ids)] = p / p.sum()
        return list(zip(tokens, conditionals(q, tokens), strict=True))

    def propose(self, state: DraftState) -> DraftTree:
        limit = min(self.max_nodes, state.budget)
        if limit <= 0 or not self.memory:
            self._ranks = []
            return DraftTree()
        slots = self.acceptance.template(limit)
        if self.pass_cost is not None:
            slots = slots[: best_size([s[3] for s in slots], self.pass_cost)]
        # children per slot, in rank order: slot index -> number of children it has
        wanted: dict[int, int] = {}
        for parent, _, rank, _ in slots:
            wanted[parent] = max(wanted.get(parent, 0), rank + 1)
        tail = state.tokens[-self.ngrams[0] :]  # all a lookup can see
        tree = DraftTree()
        ranks: list[int] = []
        node_of: dict[int, int] = {-1: -1}  # slot -> tree node
        drawn: dict[int, list[tuple[int, torch.Tensor | None]]] = {}
        for i, (parent, depth, rank, _) in enumerate(slots):
            if parent not in node_of or depth >= state.budget:
                continue  # the parent slot stayed empty
            if parent not in drawn:
                up = node_of[parent]
                context = tail + [tree.tokens[j] for j in tree.path_to(up)]
                entry = self._entry(context)
                drawn[parent] = self._children(entry, wanted[parent], state) if entry else []
            children = drawn[parent]
            if rank < len(children):
                token, q = children[rank]
                node_of[i] = tree.add(token, node_of[parent], q)
                ranks.append(rank)
        self._ranks = ranks
        return tree

    def prompt_rows(self, prompt_ids: list[int]) -> list[int]:
        """As Token Recycling's: the last place of each prompt token no n-gram entry starts
        from yet (most frequent first), up to ``prompt_rows``: the prefill's logits there
        seed the entries of the n-grams ending at it."""
        unseen = [(token,) not in self.memory for token in prompt_ids]
        return unseen_token_rows(prompt_ids, unseen, self.max_prompt_rows)

    def observe_prompt(self, prompt_ids: list[int], rows: list[int], logits: torch.Tensor) -> None:
        # the request's sampling is not known yet: temperature-1 entries, as under greedy
        ids, ps = self._top(logits, SamplingParams())
        for i, r in enumerate(rows):
            self._record(prompt_ids[max(0, r + 1 - self.ngrams[0]) : r + 1], ids[i], ps[i])

    def _top(self, logits: torch.Tensor, sampling: SamplingParams):
        """Each row's top-k tokens and their probabilities under ``sampling``'s shaping."""
        logits = logits[:, : self.vocab_size].float()
        probs = logits.softmax(-1) if sampling.greedy else probabilities(logits, sampling)
        top = torch.topk(probs, min(self.top_k, probs.shape[-1]), dim=-1)
        ids, ps = top.indices.tolist(), top.values.tolist()
        for i, row in enumerate(ps):  # tokens the shaping ruled out are never drafted
            kept = sum(1 for p in row if p > 0)
            ids[i], ps[i] = ids[i][:kept], row[:kept]
        return ids, ps

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if len(tree):
            self.acceptance.count(tree.parents, self._ranks, outcome.path)
        if outcome.logits is None:
            return
        ids, ps = self._top(outcome.logits, state.sampling)
        tail = state.tokens[-self.ngrams[0] :]
        self._record(tail, ids[0], ps[0])
        for i in range(len(tree)):
            path = [tree.tokens[j] for j in tree.path_to(i)]
            self._record(tail + path, ids[i + 1], ps[i + 1])
