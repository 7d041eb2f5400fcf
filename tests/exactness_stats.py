"""Statistics shared by the sampling-exactness tests: Pearson's chi-square with pooling, its
power, the smallest total-variation error a test detects, and the exact output distribution
of speculative sampling over chains (to size planted bugs).

Power. For counts of ``n`` runs over cells with probabilities ``p`` (after pooling), an
alternative ``p + d`` gives a Pearson statistic distributed, to first order, as a
noncentral chi-square with the test's degrees of freedom and noncentrality
``lam = n * sum(d**2 / p)``. By Cauchy-Schwarz, ``sum(d**2 / p) >= (sum |d|)**2 = 4 tv**2``
for every direction ``d`` (equality when mass ``tv`` moves, proportionally to ``p``, from
one half of the probability to the other). So a test detects *every* error of total
variation ``tv`` (measured on its pooled cells) with probability at least the power at
``lam = 4 n tv**2``; `min_detectable_tv` solves that for 95%, then settles it by simulating
the test on that least-seen direction (the first order is a little optimistic). An error confined to the
inside of the pooled cell is invisible; `pooled_mass` says how much probability that is.
No scipy: the chi-square tails are regularised incomplete gamma functions from torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

POWER = 0.95  # the detection probability the stated sizes are for


def as_arrays(counts, probs) -> tuple[np.ndarray, np.ndarray]:
    """Counts and probabilities as aligned arrays (dicts keyed by outcome, or arrays)."""
    if isinstance(probs, Mapping):
        keys = list(probs)
        counts = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
        probs = np.array([probs[k] for k in keys], dtype=np.float64)
    return np.asarray(counts, dtype=np.float64), np.asarray(probs, dtype=np.float64)


def probs_array(probs) -> np.ndarray:
    values = probs.values() if isinstance(probs, Mapping) else probs
    return np.asarray(list(values), dtype=np.float64)


def pooling(expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells kept apart and the cells pooled into one: those with an expected count
    below 5, grown with the next smallest until the pool reaches 5 (no pool if none is
    below 5)."""
    order = np.argsort(expected, kind="stable")
    pool = int((expected < 5).sum())
    while 0 < pool < len(order) and expected[order[:pool]].sum() < 5:
        pool += 1
    return order[pool:], order[:pool]


def pooled_cells(probs: np.ndarray, n: int) -> np.ndarray:
    """The cell probabilities the test compares, after pooling at ``n`` runs."""
    apart, pool = pooling(n * probs)
    cells = list(probs[apart])
    if len(pool):
        cells.append(probs[pool].sum())
    return np.array(cells)


def chisquare(counts, probs) -> tuple[float, float, int]:
    """Pearson's goodness-of-fit test, cells with expected count < 5 pooled (`pooling`);
    returns (p-value, statistic, degrees of freedom)."""
    counts, probs = as_arrays(counts, probs)
    expected = counts.sum() * probs
    apart, pool = pooling(expected)
    o, e = list(counts[apart]), list(expected[apart])
    if len(pool):
        o.append(counts[pool].sum())
        e.append(expected[pool].sum())
    o, e = np.array(o), np.array(e)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(o) - 1
    return chi2_sf(stat, df), stat, df


def chi2_pvalue(counts, probs) -> float:
    return chisquare(counts, probs)[0]


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom > x)."""
    half = torch.tensor([df / 2.0, x / 2.0], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))


def chi2_isf(alpha: float, df: int) -> float:
    """The critical value: P(chi-square_df > c) = alpha (bisection)."""
    lo, hi = 0.0, df + 100.0 + 20 * math.sqrt(df)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def ncx2_sf(x: float, df: int, lam: float) -> float:
    """P(noncentral chi-square (df, lam) > x): the Poisson(lam / 2) mixture of central
    chi-squares with df + 2j degrees of freedom."""
    half = lam / 2
    top = int(half + 12 * math.sqrt(half) + 60)
    j = torch.arange(top + 1, dtype=torch.float64)
    log_w = -half + j * math.log(half) - torch.lgamma(j + 1) if half > 0 else None
    weights = log_w.exp() if log_w is not None else (j == 0).double()
    tails = torch.special.gammaincc((df + 2 * j) / 2, torch.tensor(x / 2, dtype=torch.float64))
    return float((weights * tails).sum())


def power_at(lam: float, df: int, alpha: float) -> float:
    """The chance that the test rejects at level ``alpha`` when the noncentrality is ``lam``."""
    return ncx2_sf(chi2_isf(alpha, df), df, lam)


def detectable_noncentrality(df: int, alpha: float, power: float = POWER) -> float:
    """The noncentrality at which the test rejects with probability ``power``."""
    crit = chi2_isf(alpha, df)
    lo, hi = 0.0, 10.0
    while ncx2_sf(crit, df, hi) < power:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ncx2_sf(crit, df, mid) < power else (lo, mid)
    return hi


def min_detectable_tv(probs, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest total variation (on the pooled cells) that a chi-square test of ``n``
    runs at level ``alpha`` detects with probability >= ``power`` in the direction it sees
    least (`worst_direction`). Started from the first-order answer, ``lam = 4 n tv**2``,
    and settled by simulation (the first order is a little optimistic at small sizes)."""
    cells = pooled_cells(probs_array(probs), n)
    first = math.sqrt(detectable_noncentrality(len(cells) - 1, alpha, power) / (4 * n))
    lo, hi = 0.5 * first, 2.0 * first
    for _ in range(14):  # same trials at every size: the power is monotone in tv
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulated_power(cells, n, alpha, mid) < power else (lo, mid)
    return hi


def simulated_power(cells: np.ndarray, n: int, alpha: float, tv: float, trials: int = 4000):
    """How often the test rejects counts of ``n`` runs drawn from ``cells`` (pooled cell
    probabilities) moved by ``tv`` in `worst_direction` (seeded)."""
    wrong = worst_direction(cells, n, tv)
    counts = np.random.default_rng(0).multinomial(n, wrong, size=trials)
    expected = n * cells
    stats = ((counts - expected) ** 2 / expected).sum(axis=1)
    return float((stats > chi2_isf(alpha, len(cells) - 1)).mean())


def pooled_mass(probs, n: int) -> float:
    """The probability inside the pooled cell (errors there are not seen)."""
    probs = probs_array(probs)
    _, pool = pooling(n * probs)
    return float(probs[pool].sum())


def noncentrality(probs, wrong, n: int) -> float:
    """``n * sum(d**2 / p)`` on the pooled cells: what a given error ``wrong`` (a distribution
    on the same outcomes) gives the test of ``n`` runs."""
    keys = list(probs)
    p = np.array([probs[k] for k in keys])
    w = np.array([wrong.get(k, 0.0) for k in keys])
    apart, pool = pooling(n * p)
    d = list(w[apart] - p[apart]) + ([w[pool].sum() - p[pool].sum()] if len(pool) else [])
    e = list(p[apart]) + ([p[pool].sum()] if len(pool) else [])
    return float(n * sum(x * x / y for x, y in zip(d, e, strict=True)))


def pooled_tv(probs, wrong, n: int) -> float:
    """The total variation between ``wrong`` and ``probs`` on the cells the test of ``n``
    runs compares (what `min_detectable_tv` speaks of)."""
    keys = list(probs)
    p = np.array([probs[k] for k in keys])
    w = np.array([wrong.get(k, 0.0) for k in keys])
    apart, pool = pooling(n * p)
    return 0.5 * float(np.abs(w[apart] - p[apart]).sum() + abs(w[pool].sum() - p[pool].sum()))


def total_variation(a: Mapping, b: Mapping) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def worst_direction(probs: np.ndarray, n: int, tv: float) -> np.ndarray:
    """``probs`` with mass ``tv`` moved, proportionally to ``probs``, from the pooled cells
    holding about half of the probability to the others: the error a chi-square test sees
    least at that size (all of it on cells the test keeps apart or pools as a whole)."""
    apart, pool = pooling(n * probs)
    groups = [[i] for i in apart] + ([list(pool)] if len(pool) else [])
    groups.sort(key=lambda g: -probs[g].sum())
    up, mass = np.zeros(len(probs), dtype=bool), 0.0
    for g in groups:  # greedy halving by mass
        if mass + probs[g].sum() <= 0.5 or mass == 0:
            up[g], mass = True, mass + probs[g].sum()
    shift = np.where(up, probs / probs[up].sum(), -probs / probs[~up].sum())
    assert probs[~up].sum() >= tv, "no mass to move in this direction"
    return probs + tv * shift


# -- the exact output distribution of speculative sampling over chains --------------------
Row = Callable[[tuple[int, ...]], torch.Tensor]


def chain_outcomes(
    p: Row,
    q: Row,
    chain_length: Callable[[int], int],
    length: int,
    eos: frozenset[int] = frozenset(),
    prefill: bool = True,
    reported_q: Row | None = None,
    accept_scale: float = 1.0,
    residual_mix: float = 0.0,
) -> dict[tuple[int, ...], float]:
    """The exact distribution of what speculative sampling over chains commits, by
    recursion over committed prefixes: each step drafts ``chain_length(len(committed))``
    tokens from ``q`` (each given the path before it), accepts each with
    ``min(1, accept_scale * p / q')`` and after a rejection draws from
    ``(1 - residual_mix) * norm(max(p - q', 0)) + residual_mix * p``, where ``q'`` is
    ``reported_q`` (default ``q``); after a full acceptance the bonus comes from ``p``.
    ``prefill``: the first token is drawn from ``p`` alone (the engine's prefill). An
    outcome is the committed tokens up to ``length`` or through the first of ``eos``.
    The defaults are the correct sampler; the arguments plant defects of a chosen size."""
    qr = reported_q or q
    memo: dict[tuple[int, ...], dict[tuple[int, ...], float]] = {}

    def finished(s: tuple[int, ...]) -> bool:
        return len(s) >= length or (len(s) > 0 and s[-1] in eos)

    def commit(s: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
        for t in block:  # token by token: the engine stops at EOS and at the length
            if finished(s):
                break
            s = s + (t,)
        return s

    def residual(pr: torch.Tensor, qq: torch.Tensor) -> torch.Tensor:
        r = (pr - qq).clamp(min=0)
        r = r / r.sum() if r.sum() > 0 else pr
        return (1 - residual_mix) * r + residual_mix * pr

    def step(s: tuple[int, ...], depth: int) -> dict[tuple[int, ...], float]:
        """Blocks one pass commits from ``s`` with ``depth`` tokens still to draft."""
        pr = p(s)
        if depth == 0:
            return {(t,): float(pr[t]) for t in range(len(pr)) if pr[t] > 0}
        qs, qq = q(s), qr(s)
        accept = torch.clamp(accept_scale * pr / qq, max=1.0)
        out: dict[tuple[int, ...], float] = {}
        rejected = float((qs * (1 - accept)).sum())
        for t, w in enumerate(residual(pr, qq).tolist()):
            if w > 0 and rejected > 0:
                out[(t,)] = out.get((t,), 0.0) + rejected * w
        for x in range(len(qs)):
            through = float(qs[x] * accept[x])
            if through <= 0:
                continue
            if x in eos:  # the engine ends at an accepted EOS; what follows is cut
                out[(x,)] = out.get((x,), 0.0) + through
                continue
            for block, w in step(s + (x,), depth - 1).items():
                out[(x,) + block] = out.get((x,) + block, 0.0) + through * w
        return out

    def outcomes(s: tuple[int, ...]) -> dict[tuple[int, ...], float]:
        if finished(s):
            return {s: 1.0}
        if s in memo:
            return memo[s]
        out: dict[tuple[int, ...], float] = {}
        blocks = step(s, 0 if (prefill and not s) else chain_length(len(s)))
        for block, w in blocks.items():
            for final, v in outcomes(commit(s, block)).items():
                out[final] = out.get(final, 0.0) + w * v
        memo[s] = out
        return out

    return outcomes(())


def target_outcomes(p: Row, length: int, eos: frozenset[int] = frozenset()):
    """The exact distribution of complete outcomes of plain sampling from ``p``: sequences of
    ``length`` tokens, or shorter ones that end with a token of ``eos``. Only the prefixes
    need ``p`` (one row each)."""
    out: dict[tuple[int, ...], float] = {}
    frontier = {(): 1.0}
    while frontier:
        grown: dict[tuple[int, ...], float] = {}
        for s, w in frontier.items():
            for t, pt in enumerate(p(s).tolist()):
                if pt <= 0:
                    continue
                seq = s + (t,)
                done = len(seq) >= length or t in eos
                (out if done else grown)[seq] = w * pt
        frontier = grown
    return out
