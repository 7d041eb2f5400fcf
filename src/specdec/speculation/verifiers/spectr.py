"""SpecTr: lossless verification of several i.i.d. drafts by k-sequential selection.

Sun et al. 2023, "SpecTr: Fast Speculative Decoding via Optimal Transport"
(NeurIPS 2023). SpecTr drafts ``k`` sequences i.i.d. from the drafter and
selects among them position by position, keeping every draft that agrees with
the tokens selected so far. At each position the next tokens of the ``k``
surviving drafts, ``X_1 .. X_k`` i.i.d. from the drafter's ``q``, are turned
into one token ``Y`` distributed exactly as the target's ``p`` by the paper's
k-sequential selection, K-SEQ:

    beta(rho) = sum_x min(q(x), p(x) / rho)         (what one trial accepts)
    for i = 1 .. k: accept X_i with probability min(1, p(X_i) / (rho q(X_i)))
    none accepted:  Y ~ p_res,
    p_res(x) ∝ p(x) - min(q(x), p(x) / rho) * (1 - (1 - beta)^k) / beta

The trials together accept ``x`` with probability
``min(q(x), p(x) / rho) * (1 - (1 - beta)^k) / beta``; ``p_res`` is what ``p``
still lacks, and it is a distribution (nowhere negative) exactly when
``rho * beta(rho) >= 1 - (1 - beta(rho))^k``. That holds at ``rho = k``; the
left side grows and the right side shrinks with ``rho``, so the valid ``rho``
form an interval ``[rho*, k]``, and its left end ``rho*``, the root of
``1 - (1 - beta)^k = rho * beta`` the paper prescribes, accepts the most.
`optimal_rho` finds it exactly up to a bisection inside one smooth piece of
``beta`` and returns the valid end of the final bracket (within a relative
1e-12). With ``k = 1`` K-SEQ is speculative sampling (``rho = 1``).

Over a draft tree, level by level: the candidates are the children of the
current node(s); K-SEQ over them, with the target's row of the current node,
selects ``Y``; every candidate whose token is ``Y`` becomes a current node
(several when siblings repeat a token: the paper keeps every draft consistent
with ``Y``, so their subtrees are merged); verification stops when no
candidate carries ``Y`` (``Y`` is then the recovered token) or none is left
(the bonus token is drawn from the target's row). The reported path ends at the
first current node (duplicates share tokens and target rows). Continuing when
``Y`` came from ``p_res`` but equals a drafted token is lossless: a node's
subtree depends on its token, not on how its level was resolved.

Deviations, none of which changes the output distribution:
- The paper's drafts are ``k`` independent sequences (a tree that branches at
  the root only); here any tree whose siblings are i.i.d. given their parent
  (`DraftModelDrafter`'s static tree with ``branching``, e.g. [3, 2, 1]) is
  verified the same way, one K-SEQ per level.
- K-SEQ needs a level's candidates to be i.i.d. from one ``q`` (the same
  tensor, or equal ones). Where they are not (chosen children, ``q`` None, as a
  drafter's top-k; or different ``q``) that level uses SpecInfer's recursive
  rule (`SpeculativeSampler`), which is exact for those.
- Greedy parameters use the greedy rule (`GreedyVerifier`) outright.
- The coin is ``u < p / (rho q)`` with ``u`` uniform on [0, 1).
"""

from __future__ import annotations

import numpy as np
import torch

from specdec.speculation.sampling import SamplingParams, sample
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier, check_rows
from specdec.speculation.verifiers.greedy import GreedyVerifier
from specdec.speculation.verifiers.speculative import SpeculativeSampler


def beta(p: torch.Tensor, q: torch.Tensor, rho: float) -> float:
    """``sum_x min(q(x), p(x) / rho)``: the mass one K-SEQ trial accepts."""
    return float(torch.minimum(q, p / rho).sum())


def optimal_rho(p: torch.Tensor, q: torch.Tensor, k: int, tol: float = 1e-12) -> float:
    """The smallest ``rho`` in [1, k] with ``h(rho) = rho * beta(rho) - 1 + (1 - beta(rho))^k
    >= 0`` (within a relative ``tol``, always on the valid side).

    ``beta`` is piecewise of the form ``A + B / rho``: token ``x`` gives ``q(x)`` while
    ``rho <= p(x) / q(x)`` and ``p(x) / rho`` after. So ``h`` is evaluated at the ratios
    ``p(x) / q(x)`` inside (1, k) at once (one sort, cumulative sums), the first piece
    where it turns nonnegative is found, and the root inside that piece is bisected.
    """
    if k <= 1:
        return 1.0
    p = p.detach().to("cpu", torch.float64).numpy()
    q = q.detach().to("cpu", torch.float64).numpy()
    both = (p > 0) & (q > 0)  # min(q, p / rho) is 0 elsewhere
    p, q = p[both], q[both]
    r = p / q
    low, high = r <= 1, r >= k  # for rho in [1, k]: always p / rho, always q
    mid = ~(low | high)
    order = np.argsort(r[mid], kind="stable")
    ratios, pm, qm = r[mid][order], p[mid][order], q[mid][order]
    n = len(ratios)
    # with the j smallest middle ratios below rho: beta = a[j] + b[j] / rho
    a = q[high].sum() + np.concatenate([np.cumsum(qm[::-1])[::-1], [0.0]])
    b = p[low].sum() + np.concatenate([[0.0], np.cumsum(pm)])
    knots = np.concatenate([[1.0], ratios, [float(k)]])
    j = np.concatenate([[0], np.arange(n), [n]])
    beta_at = a[j] + b[j] / knots
    h_at = knots * beta_at - 1.0 + (1.0 - beta_at) ** k
    if h_at[0] >= 0:
        return 1.0
    valid = np.flatnonzero(h_at >= 0)
    if not len(valid):  # rounding only (h(k) >= 0 in exact arithmetic): k is always valid
        return float(k)
    m = int(valid[0])
    lo, hi = float(knots[m - 1]), float(knots[m])
    a_m, b_m = float(a[m - 1]), float(b[m - 1])  # the piece (knots[m - 1], knots[m])
    while hi - lo > tol * hi:
        rho = 0.5 * (lo + hi)
        beta_rho = a_m + b_m / rho
        if rho * beta_rho - 1.0 + (1.0 - beta_rho) ** k >= 0:
            hi = rho
        else:
            lo = rho
    return hi


def k_seq_residual(p: torch.Tensor, q: torch.Tensor, rho: float, k: int) -> torch.Tensor:
    """``p_res``: the target's mass K-SEQ has not given out when all ``k`` trials reject."""
    b = beta(p, q, rho)
    if not b > 0:  # no trial can accept: p itself
        return p
    accepted = torch.minimum(q, p / rho) * ((1.0 - (1.0 - b) ** k) / b)
    r = (p - accepted).clamp_(min=0)  # rounding only: rho is valid
    total = r.sum()
    if not total > 0:  # every trial accepts (q == p): unreachable
        return p
    return r / total


class SpecTrVerifier(Verifier):
    name = "spectr"
    lossless = True

    def verify(
        self,
        tree: DraftTree,
        p: torch.Tensor,
        params: SamplingParams,
        rng: torch.Generator | None,
    ) -> Outcome:
        check_rows(tree, p)
        if params.greedy:
            return GreedyVerifier().verify(tree, p, params, rng)
        p = p.detach().to("cpu", torch.float64)
        children = tree.children()
        current = [-1]  # nodes with the accepted prefix (more than one if siblings repeat)
        while True:
            dist = p[current[0] + 1]
            candidates = [c for node in current for c in children[node]]
            if not candidates:
                return Outcome(tree.path_to(current[0]), sample(dist, rng))
            q = self._shared_q(tree, candidates, dist.shape[-1])
            if q is None:
                token = self._recursive(tree, candidates, dist, rng)
            else:
                token = self._k_seq(tree, candidates, dist, q, rng)
            selected = [c for c in candidates if tree.tokens[c] == token]
            if not selected:  # Y is the recovered token
                return Outcome(tree.path_to(current[0]), token)
            current = selected

    def _shared_q(self, tree: DraftTree, nodes: list[int], vocab: int) -> torch.Tensor | None:
        """The one ``q`` all ``nodes`` were drawn from, or None (chosen nodes, different q)."""
        first = tree.q[nodes[0]]
        if first is None:
            return None
        for n in nodes[1:]:
            q = tree.q[n]
            if q is None or not (q is first or torch.equal(q, first)):
                return None
        return SpeculativeSampler._proposal(tree, nodes[0], vocab)

    def _k_seq(
        self,
        tree: DraftTree,
        nodes: list[int],
        p: torch.Tensor,
        q: torch.Tensor,
        rng: torch.Generator | None,
    ) -> int:
        """K-SEQ over ``nodes`` (i.i.d. from ``q``): the selected token, distributed as ``p``."""
        k = len(nodes)
        rho = self._rho(p, q, k)
        for node in nodes:
            token = tree.tokens[node]
            if not q[token] > 0:
                raise ValueError(
                    f"node {node}: token {token} has probability 0 under the q it was drawn from"
                )
            coin = float(torch.rand(1, generator=rng, dtype=torch.float64))
            if coin < float(p[token]) / (rho * float(q[token])):
                return token
        return sample(self._k_seq_residual(p, q, rho, k), rng)

    def _recursive(
        self, tree: DraftTree, nodes: list[int], p: torch.Tensor, rng: torch.Generator | None
    ) -> int:
        """SpecInfer's rule over ``nodes`` (one level of `SpeculativeSampler`)."""
        for node in nodes:
            q = SpeculativeSampler._proposal(tree, node, p.shape[-1])
            token = tree.tokens[node]
            coin = float(torch.rand(1, generator=rng, dtype=torch.float64))
            if coin < float(p[token]) / float(q[token]):
                return token
            p = SpeculativeSampler._residual(p, q)
        return sample(p, rng)

    # The two formulas, as methods so tests can plant bugs in them.
    @staticmethod
    def _rho(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
        return optimal_rho(p, q, k)

    @staticmethod
    def _k_seq_residual(p: torch.Tensor, q: torch.Tensor, rho: float, k: int) -> torch.Tensor:
        return k_seq_residual(p, q, rho, k)
