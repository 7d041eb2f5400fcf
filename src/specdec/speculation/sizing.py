"""How big a draft tree should be on this machine: expected tokens per unit of pass time.

- `best_size`: how many of a tree's nodes (best first) maximise expected tokens per unit
  of the target's measured pass time.
- `TreeBudget`: the size of a dynamic draft-model tree, from measured pass costs.
- `RankAcceptance`: a tree shape learnt online from which ranked candidates get accepted.
- `ShareCalibration`: how many tokens a retrieved trie's share of matches is worth, learnt
  online, so that retrieval trees can be sized by the pass-cost curve too.
- `TrieSizer`: cuts a weighted trie of deterministic proposals to what pays.
Sizing only decides which nodes are drafted, so it is lossless with every verifier.
"""

from __future__ import annotations

import heapq
import math

import torch

from specdec.speculation.tree import depths_of


class TreeBudget:
    """How big a dynamic tree should be on this hardware: maximise expected tokens per second.

    A drafted node is accepted with about the probability of its path under the
    drafter (the product of its tokens' draft probabilities; EAGLE-2's and DySpec's
    observation), so the expected tokens of a step with the ``n`` most probable
    nodes are ``1 + c * (P_1 + ... + P_n)``, where ``c`` calibrates the drafter's
    confidence against what the target actually accepts (learnt online). The
    step costs the drafting time plus one target pass over ``n + 1`` tokens, read
    from the target's measured pass-cost curve (`specdec.models.pass_cost`).
    ``best_size`` picks the ``n`` with the most tokens per millisecond, and
    ``worth_expanding`` stops the drafter from drafting a level whose best case
    would not raise that rate.
    """

    def __init__(
        self,
        verify_ms,
        draft_ms,
        max_nodes: int = 32,
        calibration: float = 1.0,
        smoothing: float = 0.1,
    ) -> None:
        # n tokens -> ms of one pass; a pass over more tokens that costs less (bf16 kernels
        # are slower for one row than for four) could be had by drafting more: plan with
        # the cheapest pass over at least n tokens
        self.verify_ms = _cheapest_at_least(verify_ms)
        self.draft_ms = _cheapest_at_least(draft_ms)
        self.max_nodes = max_nodes
        self.calibration = calibration
        self.smoothing = smoothing
        self._predicted = self._accepted = 2.0  # a prior: calibrated until told otherwise

    def best_size(self, probs: list[float], spent_ms: float) -> tuple[int, float]:
        """``probs``: path probabilities, most probable first. Returns (nodes, tokens per ms)."""
        best_n, best_rate, total = 0, 1.0 / (spent_ms + self.verify_ms(1)), 1.0
        for n, p in enumerate(probs[: self.max_nodes], start=1):
            total += self.calibration * p
            rate = total / (spent_ms + self.verify_ms(n + 1))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n, best_rate

    def worth_expanding(
        self, probs: list[float], spent_ms: float, expand: list[float], spread: float
    ) -> bool:
        """Would one more level pay? ``expand``: path probabilities of the nodes a draft pass
        would expand; each is expected to gain a child of about its probability times
        ``spread`` (the share of a node's mass its best children have carried so far).
        Compares the best tree after that pass with the best tree now."""
        _, now = self.best_size(probs, spent_ms)
        grown = sorted(probs + [p * spread for p in expand], reverse=True)
        _, after = self.best_size(grown, spent_ms + self.draft_ms(len(expand)))
        return after > now

    def observe(self, predicted: float, accepted: int) -> None:
        """The tree's path probabilities summed to ``predicted``; the target kept ``accepted``."""
        a = self.smoothing
        self._predicted = (1 - a) * self._predicted + a * predicted
        self._accepted = (1 - a) * self._accepted + a * accepted
        if self._predicted > 0:
            self.calibration = min(max(self._accepted / self._predicted, 0.2), 2.0)


def _cheapest_at_least(cost, limit: int = 128):
    """n -> min over m >= n of cost(m): a non-decreasing cost (memoised up to ``limit``)."""
    table = [cost(n) for n in range(limit + 1)]
    for n in range(limit - 1, -1, -1):
        table[n] = min(table[n], table[n + 1])
    return lambda n: table[n] if n <= limit else cost(n)


# Prior chance that a node's rank-r candidate is the target's next token, given the node was
# accepted (a guess in the spirit of Token Recycling's template, which gives rank 0 the deepest
# subtree); replaced by counts as the drafter observes verifications.
_RANK_PRIOR = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
_PRIOR_WEIGHT = 20.0  # the prior counts as this many observations


class RankAcceptance:
    """Online acceptance rates of a ranked tree: P(the rank-``r`` child at depth ``d`` is
    accepted | its parent was), counted from every verification (with a weak prior).

    A node's score is the product of these along its path: the chance it is accepted,
    i.e. the tokens it adds in expectation. Drafters whose children come ranked
    (Token Recycling's matrix, STAND's stored distributions) grow their trees best-first
    by this score and size them with the target's pass-cost curve (`best_size`): the
    tree shape is learnt from data, online.
    """

    def __init__(self, max_depth: int, ranks: int) -> None:
        prior = torch.tensor([_RANK_PRIOR[min(r, len(_RANK_PRIOR) - 1)] for r in range(ranks)])
        self.hits = (prior * _PRIOR_WEIGHT).repeat(max_depth, 1).double()
        self.trials = torch.full((max_depth, ranks), _PRIOR_WEIGHT, dtype=torch.float64)
        self.max_depth, self.ranks = max_depth, ranks

    def probs(self) -> list[list[float]]:
        return (self.hits / self.trials).tolist()

    def count(self, parents: list[int], ranks: list[int], path: list[int]) -> None:
        """Every child of the root or of an accepted node was a trial of its (depth, rank)."""
        depth = depths_of(parents)
        on_path, accepted = {-1, *path}, set(path)
        for i, p in enumerate(parents):
            if p in on_path:
                d, r = depth[i], ranks[i]
                self.trials[d, r] += 1
                if i in accepted:
                    self.hits[d, r] += 1

    def template(self, max_nodes: int) -> list[tuple[int, int, int, float]]:
        """The ``max_nodes`` best-scoring nodes of the full ranked tree, best first:
        (parent index or -1, depth, rank, score). A child's rank-``r + 1`` sibling is
        considered only once the rank-``r`` one is in, so ranks under a parent are
        contiguous from 0."""
        probs = self.probs()
        out: list[tuple[int, int, int, float]] = []
        heap = [
            (-probs[0][0], 0, -1, 0, 0, 1.0)
        ]  # (-score, tie, parent, depth, rank, parent score)
        tie = 1
        while heap and len(out) < max_nodes:
            neg, _, parent, d, r, base = heapq.heappop(heap)
            node = len(out)
            out.append((parent, d, r, -neg))
            if r + 1 < self.ranks:  # the next sibling
                heapq.heappush(heap, (-base * probs[d][r + 1], tie, parent, d, r + 1, base))
                tie += 1
            if d + 1 < self.max_depth:  # the first child
                heapq.heappush(heap, (neg * probs[d + 1][0], tie, node, d + 1, 0, -neg))
                tie += 1
        return out


def best_size(scores: list[float], cost, fixed: int = 0) -> int:
    """How many of the nodes (best first, ``scores`` = chance each is accepted) maximise
    expected tokens per unit of pass time under the pass-cost curve ``cost``, beside
    ``fixed`` nodes the pass carries anyway (counted in its size, not in its tokens)."""
    best_n, best_rate, expected = 0, 1.0 / cost(fixed + 1), 1.0
    for n, s in enumerate(scores, start=1):
        expected += s
        rate = expected / cost(fixed + n + 1)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


class ShareCalibration:
    """Accepted tokens per unit of retrieved share, learnt per kind of match (e.g. the length
    of the suffix that matched).

    A node of a retrieved trie carries the share of the retrieved continuations that
    pass through it; if the target followed what was retrieved, that share would be the
    chance the node is accepted. How far it does is measured: ``factor(key)`` is the
    tokens accepted per unit of share predicted, counted over every verified tree of that
    key (with a prior of ``prior`` over ``weight`` units), so ``factor * share`` is a
    node's expected contribution, ready for `best_size`.
    """

    def __init__(self, prior: float = 1.0, weight: float = 4.0) -> None:
        self.prior, self.weight = prior, weight
        self._predicted: dict[object, float] = {}
        self._accepted: dict[object, float] = {}

    def factor(self, key: object) -> float:
        w = self.weight
        return (self._accepted.get(key, 0.0) + self.prior * w) / (self._predicted.get(key, 0.0) + w)

    def observe(self, key: object, predicted: float, accepted: int) -> None:
        """A tree whose shares summed to ``predicted`` had ``accepted`` tokens accepted."""
        self._predicted[key] = self._predicted.get(key, 0.0) + predicted
        self._accepted[key] = self._accepted.get(key, 0.0) + accepted


class Revisit:
    """Per kind of proposal (e.g. the length of the match it came from): counts the steps
    on which that kind was judged not worth drafting, and says when to draft it anyway
    (every ``every``-th such step), so that what it is worth can be learnt again."""

    def __init__(self, every: int = 16) -> None:
        self.every = every
        self._skipped: dict[object, int] = {}

    def now(self, key: object) -> bool:
        """One more skipped step for ``key``; True if this one should draft regardless."""
        n = self._skipped[key] = self._skipped.get(key, 0) + 1
        return n % self.every == 0


class TrieSizer:
    """Cuts a weighted trie of deterministic proposals (prompt lookup, an n-gram cache) to
    the size that maximises expected tokens per unit of the target's pass time.

    A node's chance of acceptance is taken as its share of the trie's weight times the
    tokens accepted per unit of share so far at its depth after proposals of the same
    kind (``key``, e.g. the length of the n-gram that matched; `ShareCalibration` keyed
    by (key, depth), or by key alone when not ``by_depth``), never more than its
    parent's. The kept nodes come best first. A
    kind whose tree is cut to nothing still drafts its best node once in
    ``EXPLORE_EVERY`` times, so that what it is worth can be learnt again.
    """

    EXPLORE_EVERY = 16

    def __init__(self, cost, by_depth: bool = True) -> None:
        self.cost = cost
        self.by_depth = by_depth
        self.calibration = ShareCalibration()
        self.revisit = Revisit(self.EXPLORE_EVERY)
        self._drafted: tuple[object, list[int], list[float]] | None = None  # key, depths, shares
        self.expected = 0.0  # the last cut's expected accepted tokens
        self.scores: list[float] = []  # the last cut's nodes' chances of acceptance

    def may_pay(self, key: object) -> bool:
        """Could a tree after a proposal of kind ``key`` pay at all? Its best node carries
        at most the whole share."""
        return best_size([self.calibration.factor(self._learnt_as(key, 0))], self.cost) > 0

    def _learnt_as(self, key: object, depth: int) -> object:
        return (key, depth) if self.by_depth else key

    def cut(self, tree, shares: list[float], key: object, explore: bool = False):
        """``tree`` with ``shares[i]`` for node i (parents first) -> the kept subtree.
        ``explore``: this step was already chosen to draft a kind judged worthless
        (`Revisit.now` said so), so keep at least one node."""
        depths = tree.depths
        scores: list[float] = []
        for i, p in enumerate(tree.parents):
            s = shares[i] * self.calibration.factor(self._learnt_as(key, depths[i]))
            scores.append(min(s, scores[p]) if p >= 0 else s)
        # a child never outscores its parent and ties go to the shallower node, so every
        # prefix of this order is a tree
        order = sorted(range(len(tree)), key=lambda i: (-scores[i], depths[i], i))
        n = best_size([scores[i] for i in order], self.cost)
        exploring = n == 0 and len(tree) > 0 and (explore or self.revisit.now(key))
        if exploring:
            n = 1
        keep = order[:n]
        self.expected = sum(scores[i] for i in keep)  # tokens the kept nodes should add
        # what a merge sizes by; a node drafted only to learn again must be verified
        self.scores = [math.inf] if exploring else [scores[i] for i in keep]
        self._drafted = (key, [depths[i] for i in keep], [shares[i] for i in keep])
        return tree.subtree(keep)

    def forget(self) -> None:
        """Nothing was drafted through `cut` this step."""
        self._drafted = None
        self.scores = []
        self.expected = 0.0

    def keep_only(self, nodes: list[int]) -> None:
        """Only ``nodes`` (ascending indices into the last cut's tree) were verified."""
        if self._drafted is None:
            return
        key, depths, shares = self._drafted
        self._drafted = (key, [depths[i] for i in nodes], [shares[i] for i in nodes])
        self.scores = [self.scores[i] for i in nodes]

    def observe(self, path: list[int]) -> None:
        """The verified tree was the last `cut`'s; ``path``: its accepted nodes."""
        if self._drafted is None or not self._drafted[1]:
            return
        key, depths, shares = self._drafted
        accepted = set(path)
        by_depth: dict[int, list[float]] = {}  # depth -> [share drafted, nodes accepted]
        for i, (d, share) in enumerate(zip(depths, shares, strict=True)):
            acc = by_depth.setdefault(d, [0.0, 0])
            acc[0] += share
            acc[1] += i in accepted
        learnt: dict[object, list[float]] = {}
        for d, (share, hits) in by_depth.items():
            acc = learnt.setdefault(self._learnt_as(key, d), [0.0, 0])
            acc[0] += share
            acc[1] += hits
        for k, (share, hits) in learnt.items():
            self.calibration.observe(k, share, hits)
