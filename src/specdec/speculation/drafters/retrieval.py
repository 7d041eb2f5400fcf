"""REST: drafts retrieved from a datastore by the longest matching suffix of the context.

He et al. 2023/2024, "REST: Retrieval-Based Speculative Decoding". The
datastore (`specdec.speculation.datastore`) is a corpus tokenised by the target with
a suffix array over it. Each step looks up the last ``span`` tokens of the
sequence for ``span`` = 16 down to 2 and stops at the first span that occurs;
the ``continuation`` tokens after up to ``max_matches`` of its occurrences
form a trie in which a node weighs the number of retrieved continuations
through it, and the ``max_nodes`` heaviest nodes are verified as one tree
(`DraftTree.from_paths`). Nodes are deterministic (``q`` None): exact under
greedy and speculative sampling.

As in the authors' code, matching stops at the longest span found (a shorter
span's matches are not added) and the retrieved set is the first
``max_matches`` of the suffix-array range. Deviations: the defaults are sized
for a CPU, where a pass over 64 tokens costs about three one-token passes
(REST verifies 64 nodes; here 16) and the matches are capped at 512 (REST:
5,000) to keep the Python trie cheap; the suffix array is sorted on the first
16 tokens only (all a lookup compares). And REST always verifies its full
tree; here, given the target's pass-cost curve, the tree is cut to the size
that maximises expected tokens per unit of pass time, a node's chance of
acceptance taken as its share of the retrieved continuations times how many
tokens per unit of share were accepted so far after matches of the same
length (`ShareCalibration`): a short match in a corpus unlike the text
(code retrieved for prose) soon drafts a few nodes instead of a full tree.
When even the whole share on one node would not pay after a match of that
length, the continuations are not retrieved at all (except on the turns it is
tried again), and the longest span is found by bisection over the span
lengths (a suffix that occurs has every shorter one occur), the same span as
the longest-first scan in about 5 lookups instead of up to 15. On a target
whose step takes 7 ms (SmolLM2-135M quantised), that took REST from 0.75x to
1.00x of `ar` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections import Counter

from specdec.errors import InvalidRequestError
from specdec.speculation.datastore import Datastore
from specdec.speculation.drafters.base import Drafter, DraftState
from specdec.speculation.sizing import Revisit, ShareCalibration, best_size
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome


class RetrievalDrafter(Drafter):
    name = "rest"

    def __init__(
        self,
        datastore: Datastore,
        max_nodes: int = 16,
        continuation: int = 10,
        max_span: int = 16,
        min_span: int = 2,
        max_matches: int = 512,
        pass_cost=None,
    ) -> None:
        if not 1 <= min_span <= max_span <= datastore.span:
            raise InvalidRequestError(
                f"spans must satisfy 1 <= min_span <= max_span <= {datastore.span}, got "
                f"{min_span}, {max_span}"
            )
        if min(max_nodes, continuation, max_matches) < 1:
            raise InvalidRequestError("max_nodes, continuation and max_matches must be >= 1")
        self.datastore = datastore
        self.max_nodes = max_nodes
        self.continuation = continuation
        self.min_span, self.max_span = min_span, max_span
        self.max_matches = max_matches
        self.pass_cost = pass_cost  # PassCost of the target, or None: always max_nodes
        self.calibration = ShareCalibration()
        # (span, each node's share of the retrieved continuations) of the tree drafted
        self._drafted: tuple[int, list[float]] | None = None
        # a span judged worthless is still tried now and then (its heaviest node), or what
        # it is worth could never be learnt again (e.g. when the text changes)
        self.revisit = Revisit()

    def propose(self, state: DraftState) -> DraftTree:
        self._drafted = None
        self._scores: list[float] | None = None if self.pass_cost is None else []
        limit = min(self.max_nodes, state.budget)
        if limit <= 0:
            return DraftTree()
        found = self._longest_match(state.tokens)
        if found is None:
            return DraftTree()
        span, starts = found
        exploring = False
        if self.pass_cost is not None and not self._may_pay(span):
            # even the whole share on one node would not pay: skip retrieving the
            # continuations (the costly part of a step) unless it is this span's turn
            if not self.revisit.now(span):
                return DraftTree()
            exploring = True
        length = min(self.continuation, state.budget)
        counts = Counter(self.datastore.continuations(starts[: self.max_matches], length))
        if not counts:
            return DraftTree()
        paths = list(counts)
        total = sum(counts.values())
        tree, weights = DraftTree.weighted_trie(
            [list(p) for p in paths], [counts[p] / total for p in paths], limit
        )
        scores = None
        if self.pass_cost is not None:  # heaviest first: every prefix of the nodes is a tree
            factor = self.calibration.factor(span)
            scores = [factor * w for w in weights]
            n = best_size(scores, self.pass_cost)
            if n == 0:
                exploring = exploring or self.revisit.now(span)
                n = int(exploring)
            tree, weights = tree.subtree(list(range(n))), weights[:n]
            # for a merge: a node drafted only to learn again must be verified
            scores = [math.inf] if exploring else scores[:n]
        self._drafted, self._scores = (span, weights), scores
        return tree

    def node_scores(self) -> list[float] | None:
        return self._scores

    def keep_only(self, nodes: list[int]) -> None:
        self._scores = [self._scores[i] for i in nodes]
        if self._drafted is not None:
            span, weights = self._drafted
            self._drafted = (span, [weights[i] for i in nodes])

    def _longest_match(self, tokens: list[int]) -> tuple[int, object] | None:
        """(span, starts) of the longest suffix of ``tokens`` found, ``min_span`` ..
        ``max_span``, or None. A suffix that occurs has every shorter one occur too (one
        position later), so the longest is found by bisection: about 5 lookups, not 15."""
        lo, hi = self.min_span, min(self.max_span, len(tokens))
        if hi < lo:
            return None
        starts = self.datastore.lookup(tokens[-lo:])
        if not len(starts):
            return None
        best = (lo, starts)
        lo += 1
        while lo <= hi:  # the longest is in best[0] .. hi
            mid = (lo + hi) // 2
            starts = self.datastore.lookup(tokens[-mid:])
            if len(starts):
                best, lo = (mid, starts), mid + 1
            else:
                hi = mid - 1
        return best

    def _may_pay(self, span: int) -> bool:
        """Could a tree after a match of ``span`` pay at all? Its heaviest node carries at
        most the whole share."""
        return best_size([self.calibration.factor(span)], self.pass_cost) > 0

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if self._drafted is not None and len(tree):
            span, weights = self._drafted
            self.calibration.observe(span, sum(weights), len(outcome.path))
