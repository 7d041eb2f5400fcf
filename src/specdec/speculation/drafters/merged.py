"""Several drafters feeding one tree: e.g. prompt lookup's branches beside Token Recycling's.

Each drafter proposes its own tree; the trees are overlaid from the root, in
the order the drafters are given; each keeps its own size limit, so the
merged tree has at most the sum of their sizes. A deterministic node (``q`` None) whose
parent already has a deterministic child with the same token is that child;
any other node is added as it is. Nodes drawn from a distribution are never
merged: whether a sampled sibling exists must not depend on its own token
(see `specdec.speculation.verifiers.speculative`), so a sampled duplicate stays a
sibling of its own; under greedy the verifier takes the first match anyway.
The verifier is the first drafter's (the others must not ask for another).

After verification each drafter observes its own tree and the outcome in its
own node indices: the longest prefix of the accepted path made of its nodes,
followed by the next committed token, and the logits rows of its nodes.

Sized jointly (given the target's pass-cost curve): each drafter sizes its own
tree as if it were alone, so the union is larger than what pays. A drafter
that knows each node's chance of acceptance (`Drafter.node_scores`) lets the
merge cut the union once more: a merged node scores the highest chance any
drafter gives it (never more than its parent's), nodes of drafters without
scores are always kept, and the union is cut to the best-scoring nodes that
maximise expected tokens per unit of pass time (`best_size`). Each drafter is
told which of its nodes were kept (`Drafter.keep_only`) and observes that
subtree, so it learns only from nodes that were verified.
"""

from __future__ import annotations

import math

import torch

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import Drafter, DraftState, layer_features
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.sizing import best_size
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier


class MergedDrafter(Drafter):
    def __init__(self, drafters: list[Drafter], pass_cost=None) -> None:
        if len(drafters) < 2:
            raise InvalidRequestError("merging drafters needs at least two")
        self.drafters = drafters
        self.pass_cost = pass_cost  # the target's PassCost: size the union jointly; None: not
        self.name = "+".join(d.name for d in drafters)
        self.runs_a_model = any(d.runs_a_model for d in drafters)
        self._parts: list[tuple[DraftTree, list[int]]] = []

    def share_memory(self, other: MergedDrafter) -> None:
        for mine, theirs in zip(self.drafters, other.drafters, strict=True):
            mine.share_memory(theirs)

    def reset(self, prompt_ids: list[int]) -> None:
        for d in self.drafters:
            d.reset(prompt_ids)

    def prompt_rows(self, prompt_ids: list[int]) -> list[int]:
        return sorted({r for d in self.drafters for r in d.prompt_rows(prompt_ids)})

    def observe_prompt(self, prompt_ids: list[int], rows: list[int], logits: torch.Tensor) -> None:
        for d in self.drafters:  # the union of what they asked: rows are the same context
            d.observe_prompt(prompt_ids, rows, logits)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(sorted({i for d in self.drafters for i in d.feature_layers}))

    def observe_features(self, hidden: torch.Tensor) -> None:
        have = self.feature_layers
        for d in self.drafters:
            if d.feature_layers:
                d.observe_features(layer_features(hidden, have, d.feature_layers))

    def finish(self) -> None:
        for d in self.drafters:
            d.finish()

    def verifier(self, sampling: SamplingParams) -> Verifier | None:
        chosen = [d.verifier(sampling) for d in self.drafters]
        if any(v is not None for v in chosen[1:]):
            raise InvalidRequestError(
                f"{self.name}: only the first drafter may bring its own verifier"
            )
        return chosen[0]

    def propose(self, state: DraftState) -> DraftTree:
        merged = DraftTree()
        # (parent in merged, token) -> merged node, for deterministic nodes only
        by_token: dict[tuple[int, int], int] = {}
        score: list[float] = []  # merged node -> the highest chance a drafter gives it
        self._parts = []
        for drafter in self.drafters:
            tree = drafter.propose(state)
            own = drafter.node_scores() if self.pass_cost is not None else None
            where: list[int] = []  # this tree's node -> merged node
            for i, (token, parent, q) in enumerate(
                zip(tree.tokens, tree.parents, tree.q, strict=True)
            ):
                up = where[parent] if parent >= 0 else -1
                node = by_token.get((up, token)) if q is None else None
                if node is None:
                    node = merged.add(token, up, q)
                    score.append(-math.inf)
                    if q is None:
                        by_token[(up, token)] = node
                score[node] = max(score[node], own[i] if own is not None else math.inf)
                where.append(node)
            self._parts.append((tree, where))
        if self.pass_cost is None or len(merged) == 0:
            return merged
        return self._cut(merged, score)

    def _cut(self, merged: DraftTree, score: list[float]) -> DraftTree:
        """The union cut to what pays; each drafter keeps (and is told) its part of it."""
        for i, p in enumerate(merged.parents):  # a child never outscores its parent
            if p >= 0:
                score[i] = min(score[i], score[p])
        depths = merged.depths
        fixed = [i for i in range(len(merged)) if score[i] == math.inf]
        order = sorted(
            (i for i in range(len(merged)) if score[i] != math.inf),
            key=lambda i: (-score[i], depths[i], i),
        )  # every prefix of it, beside the fixed nodes, is a tree
        n = best_size([score[i] for i in order], self.pass_cost, fixed=len(fixed))
        if n == len(order):
            return merged
        kept = sorted(fixed + order[:n])
        renumber = {old: new for new, old in enumerate(kept)}
        parts = []
        for drafter, (tree, where) in zip(self.drafters, self._parts, strict=True):
            mine = [i for i, m in enumerate(where) if m in renumber]
            if len(mine) < len(tree):
                drafter.keep_only(mine)
                tree = tree.subtree(mine)
            parts.append((tree, [renumber[where[i]] for i in mine]))
        self._parts = parts
        return merged.subtree(kept)

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        committed = outcome.tokens(tree)
        for drafter, (own, where) in zip(self.drafters, self._parts, strict=True):
            back = {m: i for i, m in enumerate(where)}
            path: list[int] = []
            for m in outcome.path:
                i = back.get(m)
                if i is None or (own.parents[i] != (path[-1] if path else -1)):
                    break
                path.append(i)
            sub = Outcome(path, committed[len(path)])
            if outcome.logits is not None:
                rows = [0] + [m + 1 for m in where]
                sub.logits = outcome.logits[torch.tensor(rows)]
            drafter.observe(state, own, sub)
