"""Verifiers: exactness of speculative sampling, SpecTr and RSD by enumeration, and greedy
verification.

The exactness tests use a synthetic language model over V = 5 tokens: the target
``P(prefix)`` and the drafter ``Q(prefix)`` are random distributions, one per
prefix (seeded, memoised). The exact target probability of the first three
generated tokens is ``P(())[a] * P((a,))[b] * P((a, b))[c]`` (125 outcomes).
Generation is simulated with the verifier: draft a tree from ``Q``, take the
target rows from ``P``, verify, commit the accepted path and the bonus token,
and go on from the new prefix until three tokens are out.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from exactness_stats import (
    chain_outcomes,
    chi2_sf,
    chisquare,
    min_detectable_tv,
    noncentrality,
    pooled_tv,
    total_variation,
)

from specdec.errors import InvalidRequestError
from specdec.speculation.sampling import SamplingParams, probabilities
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.greedy import GreedyVerifier
from specdec.speculation.verifiers.spectr import SpecTrVerifier, beta, k_seq_residual, optimal_rho
from specdec.speculation.verifiers.speculative import SpeculativeSampler
from specdec.speculation.without_replacement import beam_level, conditionals, gumbel_top_k

V = 5  # vocabulary size
LENGTH = 3  # tokens whose joint distribution is checked
N = 20_000  # simulated generations per configuration
ALPHA = 0.001  # significance level of the chi-square tests
# The smallest total variation (on the pooled cells) each chi-square test here detects with
# probability >= 95% in any direction (exactness_stats.min_detectable_tv, rounded up;
# checked by test_stated_detectable_sizes): N runs over the 125 sequences, PLANTED_N runs,
# and the 20 ordered pairs of test_gumbel_top_k_samples_without_replacement.
DETECTS_TV = {"N": 0.035, "PLANTED_N": 0.068, "gumbel-pairs": 0.032}


class ToyLM:
    """Next-token distributions of a synthetic language model, one random distribution per
    prefix (a tuple of tokens), drawn on first use from a generator seeded by the prefix.

    ``kind="target"``: Dirichlet(1). ``kind="drafter"``: a mix of the target's distribution
    and Dirichlet(0.5) noise, with one token per prefix pushed down to about 1e-3 (a
    drafter that is close to the target but not equal, and nearly ignores some tokens).
    """

    def __init__(self, seed: int, kind: str, target: ToyLM | None = None) -> None:
        self.seed, self.kind, self.target = seed, kind, target
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:
        row = self.memo.get(prefix)
        if row is None:
            # The length keeps prefixes that differ only by trailing zeros apart.
            rng = np.random.default_rng([self.seed, len(prefix), *prefix])
            if self.kind == "target":
                x = rng.dirichlet(np.ones(V))
            else:
                x = 0.4 * self.target(prefix).numpy() + 0.6 * rng.dirichlet(np.full(V, 0.5))
                x[rng.integers(V)] = 1e-3
                x = x / x.sum()
            row = self.memo[prefix] = torch.from_numpy(x)
        return row

    def top(self, prefix: tuple[int, ...], k: int) -> list[int]:
        return torch.topk(self(prefix), k).indices.tolist()


P = ToyLM(1234, "target")
Q = ToyLM(5678, "drafter", target=P)


def exact_joint() -> np.ndarray:
    """Target probability of every sequence of LENGTH tokens, in itertools.product order."""
    out = np.empty(V**LENGTH)
    for i, seq in enumerate(itertools.product(range(V), repeat=LENGTH)):
        out[i] = np.prod([float(P(seq[:j])[t]) for j, t in enumerate(seq)])
    return out


# Tree shapes, one entry per depth: ("sample", m) = m i.i.d. draws from Q of the path
# (with replacement, sharing that q); ("top", k) = Q's top-k tokens, chosen (q None);
# ("wor", m) = m draws without replacement (Gumbel-Top-k), each with its conditional q
# (RSD-C); ("beam", w) = one level of a stochastic beam search of width w over the whole
# tree, each node with its conditional q (RSD-S; a beam shape is beam levels only).
SHAPES = {
    "chain-1": [("sample", 1)],
    "chain-2": [("sample", 1)] * 2,
    "chain-3": [("sample", 1)] * 3,
    "iid-2x2": [("sample", 2)] * 2,
    "iid-3x2": [("sample", 3)] * 2,
    "top2-x2": [("top", 2)] * 2,
    "top2-then-iid2": [("top", 2), ("sample", 2)],
    "rsd-c-3x2": [("wor", 3)] * 2,
    "rsd-s-3x2": [("beam", 3)] * 2,
}


def draft(prefix: tuple[int, ...], shape, g: torch.Generator, renormalise: bool = True):
    """A draft tree after ``prefix`` and the token sequence (prefix + path) of each node.

    ``renormalise=False`` plants a bug in drafting without replacement: every sibling
    reports the parent's q instead of q without the earlier siblings."""
    if shape[0][0] == "beam":
        return draft_beam(prefix, shape, g, renormalise)
    tree = DraftTree()
    seqs: list[tuple[int, ...]] = []
    frontier = [(-1, prefix)]
    for kind, width in shape:
        nxt = []
        for parent, seq in frontier:
            if kind == "sample":
                q = Q(seq)
                tokens = torch.multinomial(q, width, replacement=True, generator=g).tolist()
                qs = [q] * width
            elif kind == "wor":
                tokens, qs = gumbel_top_k(Q(seq), width, g)
                qs = qs if renormalise else [Q(seq)] * len(tokens)
            else:
                tokens = Q.top(seq, width)
                qs = [None] * width
            for t, q in zip(tokens, qs, strict=True):
                node = tree.add(t, parent, q)
                seqs.append(seq + (t,))
                nxt.append((node, seq + (t,)))
        frontier = nxt
    return tree, seqs


def draft_beam(prefix: tuple[int, ...], shape, g: torch.Generator, renormalise: bool = True):
    """RSD-S: the tree of a stochastic beam search over Q, one level per entry of ``shape``."""
    tree = DraftTree()
    seqs: list[tuple[int, ...]] = []
    beam = [(-1, prefix)]
    log_p, scores = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for _, width in shape:
        qs = [Q(seq) for _, seq in beam]
        kept = sorted(
            beam_level(torch.stack(qs).log(), log_p, scores, width, g), key=lambda c: c[0]
        )
        nxt = []
        for b, (parent, seq) in enumerate(beam):
            tokens = [t for i, t, _, _ in kept if i == b]
            conds = conditionals(qs[b], tokens) if renormalise else [qs[b]] * len(tokens)
            for t, q in zip(tokens, conds, strict=True):
                node = tree.add(t, parent, q)
                seqs.append(seq + (t,))
                nxt.append((node, seq + (t,)))
        beam = nxt
        log_p = torch.tensor([c[2] for c in kept], dtype=torch.float64)
        scores = torch.tensor([c[3] for c in kept], dtype=torch.float64)
    return tree, seqs


def simulate(verifier, shape, n: int = N, seed: int = 0, renormalise: bool = True) -> np.ndarray:
    """Counts of the first LENGTH generated tokens over ``n`` simulated generations."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0)
    counts: Counter[tuple[int, ...]] = Counter()
    for _ in range(n):
        out: tuple[int, ...] = ()
        while len(out) < LENGTH:
            tree, seqs = draft(out, shape, g, renormalise)
            p = torch.stack([P(out)] + [P(s) for s in seqs])
            outcome = verifier.verify(tree, p, params, g)
            out += tuple(outcome.tokens(tree))
        counts[out[:LENGTH]] += 1
    return np.array([counts[s] for s in itertools.product(range(V), repeat=LENGTH)])


def test_chi2_sf_matches_tables():
    # 0.05 and 0.001 critical values from standard chi-square tables.
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(149.44925277903675, 100) == pytest.approx(0.001, rel=1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_speculative_sampling_is_exact(shape):
    """The first 3 tokens generated with SpeculativeSampler follow the target exactly.

    N = 20,000 simulated generations per tree shape (seeded), compared with the exact
    target probabilities of the 125 three-token sequences by Pearson's chi-square test
    (cells with expected count < 5 pooled); passes if p > 0.001; detects a TV error of
    DETECTS_TV["N"] = 0.035 with probability 95%. The rsd-* shapes are
    Recursive Speculative Decoding: siblings drawn without replacement, each node's q
    its conditional, verified by this same sampler.
    """
    counts = simulate(SpeculativeSampler(), SHAPES[shape])
    pvalue, stat, df = chisquare(counts, exact_joint())
    print(f"{shape}: chi-square {stat:.1f}, df {df}, p = {pvalue:.4g} (n {N})")
    assert pvalue > ALPHA


class UnnormalisedResidual(SpeculativeSampler):
    """Planted bug: after a rejection the residual max(p - q, 0) is not renormalised, so
    later siblings are accepted too rarely (the bonus draw itself normalises, so a chain
    would not show it; trees of chosen siblings do)."""

    @staticmethod
    def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p - q).clamp(min=0)


class TargetAfterRejection(SpeculativeSampler):
    """Planted bug: after a rejection keep sampling from the target's row instead of the
    residual (the classic mistake: tokens the drafter over-proposes come out too often)."""

    @staticmethod
    def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return p


@pytest.mark.parametrize(
    "broken,shape", [(UnnormalisedResidual, "top2-x2"), (TargetAfterRejection, "chain-2")]
)
def test_planted_bug_is_detected(broken, shape):
    """The same check (N = 20,000, same seed, chi-square) must reject a broken verifier
    with p < 0.001: the test has the power to see a wrong residual."""
    counts = simulate(broken(), SHAPES[shape])
    pvalue, stat, df = chisquare(counts, exact_joint())
    print(f"{broken.__name__} on {shape}: chi-square {stat:.1f}, df {df}, p = {pvalue:.4g} (n {N})")
    assert pvalue < ALPHA


class ResidualPartlyTarget(SpeculativeSampler):
    """Planted defect of a chosen size: after a rejection the draw comes from the residual
    mixed with the target's row, ``(1 - w) norm(max(p - q, 0)) + w p``."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def _residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * SpeculativeSampler._residual(p, q) + self.weight * p


# the weight whose error on the pooled cells is just above DETECTS_TV["N"] (0.0351 on the
# 125 sequences, from chain_outcomes; checked below)
THRESHOLD_WEIGHT = 0.152


def exact_joint_by_sequence() -> dict[tuple[int, ...], float]:
    seqs = itertools.product(range(V), repeat=LENGTH)
    return {s: float(x) for s, x in zip(seqs, exact_joint(), strict=True)}


def test_planted_bug_at_the_stated_size_is_detected():
    """A defect whose error is the stated detectable size fails the same test (N runs,
    chain-2, p < ALPHA). Its exact output distribution is enumerated (`chain_outcomes`),
    so its size is known, not guessed."""
    exact = exact_joint_by_sequence()
    wrong = chain_outcomes(
        P, Q, lambda done: 2, LENGTH, prefill=False, residual_mix=THRESHOLD_WEIGHT
    )
    seen = pooled_tv(exact, wrong, N)
    assert DETECTS_TV["N"] <= seen < 1.05 * DETECTS_TV["N"]
    counts = simulate(ResidualPartlyTarget(THRESHOLD_WEIGHT), SHAPES["chain-2"])
    pvalue, stat, df = chisquare(counts, exact_joint())
    lam = noncentrality(exact, wrong, N)
    print(f"residual partly target: TV {seen:.4f}, noncentrality {lam:.0f}, p = {pvalue:.3g}")
    assert pvalue < ALPHA


def test_chain_outcomes_of_the_correct_sampler_are_the_target():
    """The enumeration that sizes the defect gives the target for the correct sampler."""
    right = chain_outcomes(P, Q, lambda done: 2, LENGTH, prefill=False)
    assert total_variation(right, exact_joint_by_sequence()) < 1e-12


def normal_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def detectable_shift(n: int, p: float, bound: float) -> float:
    """The smallest change of a cell's probability that moves its count of ``n`` past
    ``bound`` from ``n p`` with probability >= 95% (normal approximation, bisection)."""
    lo, hi = 0.0, 1.0 - p
    for _ in range(60):
        d = (lo + hi) / 2
        sd = math.sqrt(n * (p + d) * (1 - p - d))
        lo, hi = (d, hi) if normal_sf((bound - n * d) / sd) < 0.95 else (lo, d)
    return hi


# test_deterministic_child_acceptance_probability: three counts of 20,000 within 350 of
# their expectation; an error of this TV (mass moved into or out of the acceptance cell,
# which varies most) leaves them with probability < 5%. Checked below.
DETERMINISTIC_CHILD_DETECTS_TV = 0.024


def test_stated_detectable_sizes():
    """The sizes stated here are what exactness_stats computes (rounded up)."""
    q = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0], dtype=torch.float64)
    pairs = list(itertools.permutations(range(V), 2))
    gumbel = np.array([float(q[a] * q[b] / (1 - q[a])) for a, b in pairs])
    for name, probs, n in [
        ("N", exact_joint(), N),
        ("PLANTED_N", exact_joint(), PLANTED_N),
        ("gumbel-pairs", gumbel, 10_000),
    ]:
        size = min_detectable_tv(probs, n, ALPHA)
        assert DETECTS_TV[name] - 0.002 < size <= DETECTS_TV[name], (name, size)
    size = max(detectable_shift(20_000, p, 350) for p in (0.6, 0.1, 0.3))
    assert DETERMINISTIC_CHILD_DETECTS_TV - 0.001 < size <= DETERMINISTIC_CHILD_DETECTS_TV


def test_sampler_is_reproducible():
    a = simulate(SpeculativeSampler(), SHAPES["iid-2x2"], n=200, seed=7)
    b = simulate(SpeculativeSampler(), SHAPES["iid-2x2"], n=200, seed=7)
    assert (a == b).all()


# --- SpecTr and RSD ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["iid-2x2", "iid-3x2"])
def test_spectr_is_exact(shape):
    """SpecTr (K-SEQ over i.i.d. siblings, duplicate siblings merged) follows the target:
    the same check as above, N = 20,000, chi-square p > 0.001 (detects TV 0.035)."""
    counts = simulate(SpecTrVerifier(), SHAPES[shape])
    pvalue, stat, df = chisquare(counts, exact_joint())
    print(f"SpecTr {shape}: chi-square {stat:.1f}, df {df}, p = {pvalue:.4g} (n {N})")
    assert pvalue > ALPHA


class SpecTrOneDraftResidual(SpecTrVerifier):
    """Planted bug: K-SEQ's acceptance (with rho) but the residual of a single draft,
    norm(max(p - q, 0)), without the rho / k correction."""

    @staticmethod
    def _k_seq_residual(p, q, rho, k):
        return SpeculativeSampler._residual(p, q)


class SpecTrWithoutRho(SpecTrVerifier):
    """Planted bug: rho = 1 (each draft accepted with min(1, p / q) as if it were the only
    one); K-SEQ's residual then goes negative and is clipped."""

    @staticmethod
    def _rho(p, q, k):
        return 1.0


PLANTED_N = 5_000  # every planted bug below gives p < 1e-15 at this size
# (a chi-square of PLANTED_N runs detects any TV error of DETECTS_TV["PLANTED_N"] = 0.068)


@pytest.mark.parametrize(
    "verifier,shape,renormalise",
    [
        (SpecTrOneDraftResidual(), "iid-3x2", True),
        (SpecTrWithoutRho(), "iid-2x2", True),
        (SpeculativeSampler(), "rsd-c-3x2", False),
        (SpeculativeSampler(), "rsd-s-3x2", False),
    ],
    ids=[
        "spectr-one-draft-residual",
        "spectr-without-rho",
        "rsd-c-q-not-renormalised",
        "rsd-s-q-not-renormalised",
    ],
)
def test_multi_draft_planted_bug_is_detected(verifier, shape, renormalise):
    """The chi-square check (5,000 runs; it detects any TV error of 0.068) rejects a broken
    SpecTr or RSD with p < 0.001.
    ``renormalise=False``: siblings drawn without replacement report the parent's q
    instead of q without the earlier siblings."""
    counts = simulate(verifier, SHAPES[shape], n=PLANTED_N, renormalise=renormalise)
    pvalue, stat, df = chisquare(counts, exact_joint())
    print(f"{shape}: chi-square {stat:.1f}, df {df}, p = {pvalue:.4g} (n {PLANTED_N})")
    assert pvalue < ALPHA


def validity(p, q, k, rho):
    """``rho * beta - (1 - (1 - beta)^k)``: K-SEQ's residual is a distribution iff >= 0."""
    b = beta(p, q, rho)
    return rho * b - 1 + (1 - b) ** k


def test_k_seq_gives_exactly_the_target():
    """Enumerated, no sampling: K-SEQ's output distribution with the chosen rho,
    ``min(q, p / rho) * (1 - (1 - beta)^k) / beta + (1 - beta)^k * p_res``, is ``p``; rho
    is valid (p_res >= 0) and the smallest valid (a hair lower is not)."""
    g = torch.Generator().manual_seed(5)
    for trial in range(300):
        vocab = int(torch.randint(2, 12, (), generator=g))
        p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
        q = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
        if trial % 3 == 0:
            p[torch.randint(vocab, (2,), generator=g)] = 0  # disjoint supports happen too
        if trial % 5 == 0:
            q[torch.randint(vocab, (1,), generator=g)] = 0
        if not (p.sum() > 0 and q.sum() > 0):
            continue
        p, q = p / p.sum(), q / q.sum()
        k = int(torch.randint(1, 6, (), generator=g))
        rho = optimal_rho(p, q, k)

        assert 1 <= rho <= k
        assert validity(p, q, k, rho) >= -1e-15
        assert rho == 1 or validity(p, q, k, rho * (1 - 1e-9)) < 0
        b = beta(p, q, rho)
        chosen = torch.minimum(q, p / rho) * ((1 - (1 - b) ** k) / b if b > 0 else k)
        out = chosen + (1 - b) ** k * k_seq_residual(p, q, rho, k)
        assert torch.allclose(out, p, atol=1e-12, rtol=0)
    assert optimal_rho(p, p, 3) == 1.0  # q == p: the first draft is always accepted


def test_gumbel_top_k_samples_without_replacement():
    """The first two Gumbel-Top-k tokens have the probabilities of sequential sampling
    without replacement, q(a) q(b) / (1 - q(a)) (10,000 draws, chi-square p > 0.001), and
    each comes with its conditional distribution. Detects a TV error of
    DETECTS_TV["gumbel-pairs"] = 0.032 on the pairs with probability 95%."""
    q = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    n, counts = 10_000, Counter()
    for _ in range(n):
        tokens, qs = gumbel_top_k(q, 2, g)
        counts[tuple(tokens)] += 1
    pairs = list(itertools.permutations(range(V), 2))
    probs = np.array([float(q[a] * q[b] / (1 - q[a])) for a, b in pairs])
    pvalue, _, _ = chisquare(np.array([counts[pair] for pair in pairs]), probs)
    assert pvalue > ALPHA
    assert sum(counts[pair] for pair in pairs if 4 in pair) == 0
    tokens, qs = gumbel_top_k(q, 9, g)
    assert sorted(tokens) == [0, 1, 2, 3]  # only tokens with probability > 0
    assert torch.equal(qs[0], q)
    assert qs[1][tokens[0]] == 0 and float(qs[1].sum()) == pytest.approx(1.0)
    assert torch.allclose(qs[3], torch.eye(V, dtype=torch.float64)[tokens[3]])


def test_beam_level_keeps_each_parents_order():
    """Without noise a beam level is beam search; with noise the kept children of each
    parent are in its order of perturbed scores, and scores never exceed the parent's."""
    log_q = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64).log()
    log_p = torch.tensor([0.7, 0.3], dtype=torch.float64).log()
    kept = beam_level(log_q, log_p, torch.zeros(2), 3, None, noise=False)
    assert [(b, t) for b, t, _, _ in kept] == [(0, 0), (0, 1), (1, 2)]
    assert kept[0][2] == pytest.approx(np.log(0.42))
    g = torch.Generator().manual_seed(2)
    scores = torch.tensor([-0.5, -1.5], dtype=torch.float64)
    for _ in range(50):
        kept = beam_level(log_q, log_p, scores, 4, g)
        assert [s for _, _, _, s in kept] == sorted((s for _, _, _, s in kept), reverse=True)
        for b, _, _, s in kept:
            assert s <= float(scores[b]) + 1e-12
        kept = beam_level(log_q[:1], log_p[:1], scores[:1], 3, g)
        assert max(s for _, _, _, s in kept) == pytest.approx(-0.5)  # truncated to the parent


def test_spectr_follows_greedy_on_one_hot_rows():
    """Under sampling parameters but with one-hot target rows (a consistent target: the
    argmax depends on the token path only), SpecTr commits exactly the target's tokens and
    accepts at least as much as greedy verification; with greedy parameters it is greedy."""
    g = torch.Generator().manual_seed(4)
    sampling = SamplingParams(temperature=1.0)
    best: dict[tuple[int, ...], int] = {}

    def argmax(seq):
        return best.setdefault(seq, int(torch.randint(V, (), generator=g)))

    longer = 0
    for _ in range(300):
        tree, seqs = draft((), [("sample", int(torch.randint(1, 4, (), generator=g)))] * 2, g)
        for seq in [(), *seqs]:  # make the target often agree with some drafts
            if seq not in best and len(seq) < 2 and torch.rand((), generator=g) < 0.6:
                kids = [s[-1] for s in seqs if s[:-1] == seq]
                best[seq] = kids[int(torch.randint(len(kids), (), generator=g))]
        p = one_hot_rows([argmax(s) for s in [(), *seqs]])
        want = GreedyVerifier().verify(tree, p, GREEDY, None)
        got = SpecTrVerifier().verify(tree, p, sampling, g)
        toks = got.tokens(tree)
        assert all(t == argmax(tuple(toks[:i])) for i, t in enumerate(toks))
        assert len(got.path) >= len(want.path)
        longer += len(got.path) > len(want.path)  # via a duplicate sibling's subtree
        same = SpecTrVerifier().verify(tree, p, GREEDY, g)
        assert (same.path, same.bonus) == (want.path, want.bonus)
    assert longer > 0


# --- greedy ------------------------------------------------------------------------------

GREEDY = SamplingParams()


def one_hot_rows(best: list[int]) -> torch.Tensor:
    """Greedy-shaped rows (as the engine makes them) whose argmaxes are ``best``."""
    logits = torch.randn(len(best), V, dtype=torch.float64)
    logits[torch.arange(len(best)), best] = 10.0
    return probabilities(logits, GREEDY)


def random_tree(g: torch.Generator) -> DraftTree:
    n = int(torch.randint(1, 9, (), generator=g))
    tree = DraftTree()
    for i in range(n):
        parent = int(torch.randint(-1, i, (), generator=g)) if i else -1
        token = int(torch.randint(V, (), generator=g))
        q = None
        if torch.rand((), generator=g) < 0.5:
            q = torch.rand(V, generator=g, dtype=torch.float64) + 0.01
            q = q / q.sum()
        tree.add(token, parent, q)
    return tree


def test_sampler_reduces_to_greedy_on_one_hot_rows():
    g = torch.Generator().manual_seed(3)
    greedy, sampler = GreedyVerifier(), SpeculativeSampler()
    lengths = Counter()
    for _ in range(500):
        tree = random_tree(g)
        children = tree.children()
        best = []
        for node in [-1, *range(len(tree))]:
            kids = children[node]
            if kids and torch.rand((), generator=g) < 0.7:  # mostly follow some child
                best.append(tree.tokens[kids[int(torch.randint(len(kids), (), generator=g))]])
            else:
                best.append(int(torch.randint(V, (), generator=g)))
        p = one_hot_rows(best)
        a = greedy.verify(tree, p, GREEDY, None)
        b = sampler.verify(tree, p, GREEDY, g)
        assert (a.path, a.bonus) == (b.path, b.bonus)
        lengths[len(a.path)] += 1
    assert len(lengths) >= 3  # empty, short and longer paths all occurred


def test_greedy_accepts_whole_chain():
    tree = DraftTree.chain([1, 2, 3])
    out = GreedyVerifier().verify(tree, one_hot_rows([1, 2, 3, 4]), GREEDY, None)
    assert (out.path, out.bonus) == ([0, 1, 2], 4)
    assert out.tokens(tree) == [1, 2, 3, 4]


def test_greedy_first_rejected():
    tree = DraftTree.chain([1, 2, 3])
    out = GreedyVerifier().verify(tree, one_hot_rows([0, 2, 3, 4]), GREEDY, None)
    assert (out.path, out.bonus) == ([], 0)


def test_greedy_stops_mid_chain():
    tree = DraftTree.chain([1, 2, 3])
    out = GreedyVerifier().verify(tree, one_hot_rows([1, 2, 0, 4]), GREEDY, None)
    assert (out.path, out.bonus) == ([0, 1], 0)


def test_greedy_duplicate_siblings_take_the_first():
    # root -> node 0 (token 2), node 1 (token 2), node 3 (token 4); node 1 -> node 2 (token 3)
    tree = DraftTree([2, 2, 3, 4], [-1, -1, 1, -1])
    out = GreedyVerifier().verify(tree, one_hot_rows([2, 3, 0, 1, 0]), GREEDY, None)
    assert (out.path, out.bonus) == ([0], 3)  # node 0 has no children: bonus from its row
    out = GreedyVerifier().verify(tree, one_hot_rows([4, 0, 0, 0, 1]), GREEDY, None)
    assert (out.path, out.bonus) == ([3], 1)


def test_greedy_picks_the_matching_branch():
    # root -> 0 (token 1) -> 2 (token 3); root -> 1 (token 2) -> 3 (token 4) -> 4 (token 0)
    tree = DraftTree([1, 2, 3, 4, 0], [-1, -1, 0, 1, 3])
    out = GreedyVerifier().verify(tree, one_hot_rows([2, 0, 4, 0, 0, 3]), GREEDY, None)
    assert (out.path, out.bonus) == ([1, 3, 4], 3)


def test_empty_tree_gives_the_target_token():
    p = one_hot_rows([3])
    assert GreedyVerifier().verify(DraftTree(), p, GREEDY, None) == SpeculativeSampler().verify(
        DraftTree(), p, GREEDY, None
    )
    assert GreedyVerifier().verify(DraftTree(), p, GREEDY, None).bonus == 3


def test_greedy_verifier_refuses_sampling_params():
    with pytest.raises(InvalidRequestError):
        GreedyVerifier().verify(
            DraftTree(), one_hot_rows([0]), SamplingParams(temperature=0.7), None
        )


@pytest.mark.parametrize("verifier", [GreedyVerifier(), SpeculativeSampler(), SpecTrVerifier()])
def test_wrong_number_of_rows(verifier):
    with pytest.raises(ValueError, match="rows"):
        verifier.verify(DraftTree.chain([1, 2]), one_hot_rows([1, 2]), GREEDY, None)


def test_sampled_node_with_zero_q_is_an_error():
    q = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    tree = DraftTree.chain([3], [q])
    p = torch.full((2, V), 1 / V, dtype=torch.float64)
    with pytest.raises(ValueError, match="probability 0"):
        SpeculativeSampler().verify(tree, p, SamplingParams(temperature=1.0), None)


def test_residual_without_mass_keeps_p():
    p = torch.tensor([0.25, 0.25, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(SpeculativeSampler._residual(p, p.clone()), p)
    r = SpeculativeSampler._residual(p, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=p.dtype))
    assert r.tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]  # point mass: that token zeroed, renormalised


def test_deterministic_child_acceptance_probability():
    """A chosen child (q None) is accepted with probability p[token]; on rejection the
    bonus comes from p with that token zeroed. Detects an error of TV
    DETERMINISTIC_CHILD_DETECTS_TV = 0.024 with probability 95%."""
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0, 0.0]] + [[0.2] * V], dtype=torch.float64)
    tree = DraftTree.chain([1])
    g = torch.Generator().manual_seed(11)
    n = 20_000
    outs = Counter()
    for _ in range(n):
        o = SpeculativeSampler().verify(tree, p, SamplingParams(temperature=1.0), g)
        outs["accept" if o.path else o.bonus] += 1
    assert outs.keys() <= {"accept", 0, 2}
    # Binomial standard deviations are at most ~70; allow 5 of them.
    assert abs(outs["accept"] - 0.6 * n) < 350
    assert abs(outs[0] - 0.1 * n) < 350
    assert abs(outs[2] - 0.3 * n) < 350
