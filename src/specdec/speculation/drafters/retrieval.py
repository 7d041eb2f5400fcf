"""REST: drafts retrieved from a datastore by the longest matching suffix of the context.

He et al. 2023/2024, "REST: Retrieval-Based Speculative Decoding". The
datastore (`specdec.speculation.datastore`) is a corpus tokenised by the target with
a suffix array over it. Each step looks up the last ``span`` tokens of the
sequence for ``span`` = 16 down to 2 and stops at the first span that occurs;
the ``continuation`` tokens after up to ``max_matches`` of its occurrences
form a trie in which a node weighs the number of retrieved continuations
through it, and the ``max_nodes`` heaviest nodes are verified as one tree
(`TrieDrafter.trie`). Nodes are deterministic (``q`` None): exact under
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
tokens per unit of share were accepted so far after matches of the same length
(`TrieSizer`, shared with prompt lookup, which learns it per depth as well): a
short match in a corpus unlike the text (code retrieved for prose) soon drafts a
few nodes instead of a full tree.
When even the whole share on one node would not pay after a match of that
length, the continuations are not retrieved at all (except on the turns it is
tried again), and the longest span is found by bisection over the span
lengths (a suffix that occurs has every shorter one occur), the same span as
the longest-first scan in about 5 lookups instead of up to 15. On a target
whose step takes 7 ms (SmolLM2-135M quantised), that took REST from 0.75x to
1.00x of `ar` (docs/notes/lab-notebook.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from specdec.errors import InvalidRequestError
from specdec.speculation.datastore import Datastore, open_datastore
from specdec.speculation.drafters.base import BuildContext, DraftState, TrieDrafter
from specdec.speculation.options import SIZE_BY_COST_HELP, Options, option
from specdec.speculation.tree import DraftTree


@dataclass(frozen=True)
class RetrievalOptions(Options):
    method: ClassVar[str] = "rest"
    datastore: str = option(
        "stdlib",
        "datastore folder (`specdec datastore build`); stdlib: the Python standard library's "
        "source, built for the model's tokenizer on first use",
    )
    max_nodes: int = option(16, "most tree nodes verified in one pass", minimum=1)
    continuation: int = option(10, "tokens retrieved after each match", minimum=1)
    max_span: int = option(16, "longest suffix looked up", minimum=1)
    min_span: int = option(2, "shortest suffix looked up", minimum=1)
    max_matches: int = option(512, "most matches used per step", minimum=1)
    size_by_cost: bool = option(True, SIZE_BY_COST_HELP)

    def check(self) -> None:
        if self.min_span > self.max_span:
            raise InvalidRequestError(
                f"spans must satisfy min_span <= max_span, got {self.min_span}, {self.max_span}"
            )


class RetrievalDrafter(TrieDrafter):
    name = "rest"
    description = (
        "REST, retrieval drafting: the longest suffix of the context (16 down to 2 tokens) "
        "looked up in a datastore (suffix array over a corpus); the continuations found form "
        "a frequency-weighted tree (He et al. 2023)"
    )
    Options = RetrievalOptions

    def __init__(
        self,
        datastore: Datastore,
        options: RetrievalOptions | None = None,
        pass_cost=None,
        **given,
    ) -> None:
        """``options``, or the options as keywords (``datastore`` there is ignored: the
        opened one is given); ``pass_cost``: the target's `PassCost`."""
        o = RetrievalOptions.of(options, given)
        if o.max_span > datastore.span:
            raise InvalidRequestError(
                f"max_span must be <= {datastore.span} for this datastore, got {o.max_span}"
            )
        self.datastore = datastore
        self.max_nodes = o.max_nodes
        self.continuation = o.continuation
        self.min_span, self.max_span = o.min_span, o.max_span
        self.max_matches = o.max_matches
        # trees cut to what pays (without a cost: max_nodes), a node's chance learnt per
        # span alone: 15 spans x 10 depths would each need their own evidence
        super().__init__(pass_cost, by_depth=False)

    @classmethod
    def build(cls, ctx: BuildContext, options: RetrievalOptions) -> RetrievalDrafter:
        store = open_datastore(options.datastore, ctx.tokenizer, ctx.progress)
        return cls(store, options, pass_cost=ctx.cost_if(options.size_by_cost))

    def share_memory(self, other: RetrievalDrafter) -> None:
        self.datastore = other.datastore  # read-only: one open copy serves every request

    def propose(self, state: DraftState) -> DraftTree:
        self.start_step()
        limit = min(self.max_nodes, state.budget)
        if limit <= 0:
            return DraftTree()
        found = self._longest_match(state.tokens)
        if found is None:
            return DraftTree()
        span, starts = found
        explore = False
        if self.sizer is not None and not self.sizer.may_pay(span):
            # even the whole share on one node would not pay: skip retrieving the
            # continuations (the costly part of a step) unless it is this span's turn
            if not self.sizer.revisit.now(span):
                return DraftTree()
            explore = True
        length = min(self.continuation, state.budget)
        counts = Counter(self.datastore.continuations(starts[: self.max_matches], length))
        if not counts:
            return DraftTree()
        paths = list(counts)
        return self.trie(
            [list(p) for p in paths], [counts[p] for p in paths], limit, key=span, explore=explore
        )

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
