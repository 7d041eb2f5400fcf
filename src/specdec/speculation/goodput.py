"""How much each request of a batch drafts this step: goodput control (SmartSpec).

One batched target pass verifies every running request's tree, and its cost grows
with the total number of rows (`specdec.models.pass_cost`: on the 1.5B Q4_K_M, 16
rows cost ~4.5x one row). A request that drafts k nodes, each accepted with the
chance ``a`` given its parent was (a chain), adds ``a + a^2 + ... + a^k`` tokens in
expectation beside the one every pass gives. The batch's goodput is its expected
committed tokens per millisecond of the pass:

    (B + sum_i sum_{j<=k_i} a_i^j) / cost(B + sum_i k_i)

`GoodputControl.allocate` chooses the k_i greedily, the next most probable node of
any request first, and keeps the allocation with the highest goodput: under load
(many rows already) extra rows cost more than they earn and every k_i falls to 0,
which is plain batching. Drafting is paid too: each request's drafter runs on its own
(a draft model one request at a time), so a request drafts only when what it is
expected to add pays for its drafting time as well (measured online: a draft is priced
at the larger of its request's smoothed cost and its method's slowest recent one, since
a drafter with a draft model now and then reads a whole prompt while the batch waits).
Prompts in the same pass (new requests' parts) are work the batch does anyway: a draft
is charged the time it adds to the pass at the pass's size, against what the decoding
requests earn without the prompts. A pass that carries a prompt part is compute-bound,
where a row costs its full share and a draft, whose rows are worth less than one token
each, rarely pays; counting the prompt's time as paid for by the drafts instead (what
this ratio would do with the prompt in the denominator) drafted most in exactly those
passes, and lost throughput. ``a`` is learnt per request online: the maximum-likelihood
estimate of a geometric acceptance (accepted nodes over accepted nodes plus
rejections), started from a prior.

Deviations from SmartSpec (Liu et al., 2024): acceptance is estimated per request
from its own history (SmartSpec uses a moving average over the batch), and the
cost model is the measured pass-cost curve of this machine rather than a fitted
linear model of batched tokens. Choosing how much to draft only decides which
drafted nodes are verified, so it is lossless with every verifier.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Acceptance:
    """A request's running estimate of a drafted node's chance, given its parent's."""

    accepted: float = 1.0  # prior: one accepted, one rejected (a = 0.5)
    rejected: float = 1.0
    decay: float = 0.9  # older steps count less: acceptance drifts with the text

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, drafted_depth: int, accepted: int) -> None:
        """A step that drafted a path ``drafted_depth`` deep kept ``accepted`` nodes of it."""
        if drafted_depth <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1 if accepted < drafted_depth else 0)


class GoodputControl:
    """Per-request node counts for one batched pass that maximise expected tokens per ms.

    ``pass_ms(n)``: milliseconds of one pass over ``n`` rows. ``max_nodes``: the most a
    request may draft in a step. A batch of one is left to its drafter (which sizes its
    tree by the same curve, with more information than a chain model): `allocate`
    returns ``None`` for it, meaning no cap.
    """

    def __init__(self, pass_ms: Callable[[int], float], max_nodes: int = 16) -> None:
        self.pass_ms = pass_ms
        self.max_nodes = max_nodes

    def allocate(
        self, rates: list[float], other_rows: int = 0, draft_ms: list[float] | None = None
    ) -> list[int | None]:
        """Nodes to draft for each request, from each one's acceptance rate; ``other_rows``
        ride in the same pass without earning tokens now (prompts being prefilled);
        ``draft_ms``: what asking each request's drafter costs (a draft model runs one
        request at a time), paid once a request drafts anything."""
        b = len(rates)
        if b == 0:
            return []
        if b == 1 and other_rows == 0:
            return [None]
        draft_ms = draft_ms or [0.0] * b
        counts = [0] * b
        heap = [(-a, i) for i, a in enumerate(rates) if a > 0]  # next node's chance
        heapq.heapify(heap)
        # the prompts' rows are work the batch does anyway: a draft pays for the time it
        # adds to the pass, at the pass's size (a pass that carries a prompt is
        # compute-bound, each row costs its full share there), against what the decoding
        # requests earn per ms without the prompts
        prompts_ms = self.pass_ms(b + other_rows) - self.pass_ms(b) if other_rows else 0.0
        tokens, rows, drafting = float(b), b + other_rows, 0.0
        best_rate, best = tokens / self.pass_ms(b), list(counts)
        while heap:
            neg, i = heapq.heappop(heap)
            if counts[i] == 0:
                drafting += draft_ms[i]
            counts[i] += 1
            tokens -= neg
            rows += 1
            rate = tokens / (self.pass_ms(rows) - prompts_ms + drafting)
            if rate > best_rate:
                best_rate, best = rate, list(counts)
            if counts[i] < self.max_nodes:
                heapq.heappush(heap, (neg * rates[i], i))
        return best
