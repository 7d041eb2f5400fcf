"""The statistics behind the exactness tests' stated power (`exactness_stats`)."""

import math

import numpy as np
import pytest
import torch
from exactness_stats import (
    chi2_isf,
    chisquare,
    min_detectable_tv,
    ncx2_sf,
    pooled_tv,
    power_at,
    worst_direction,
)
from test_sampling_at_depth import RUNS, T1, exact


def normal_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def test_noncentral_chi2_with_one_degree_of_freedom():
    """With one degree of freedom, X = (Z + sqrt(lam))**2: a closed form to compare with."""
    for lam in [0.0, 0.5, 4.0, 30.0]:
        for x in [0.1, 3.84, 10.83, 40.0]:
            r, m = math.sqrt(x), math.sqrt(lam)
            want = normal_sf(r - m) + normal_sf(r + m)
            assert ncx2_sf(x, 1, lam) == pytest.approx(want, abs=1e-10)
    assert chi2_isf(0.001, 10) == pytest.approx(29.588298445074418, rel=1e-9)
    assert power_at(0.0, 10, 0.001) == pytest.approx(0.001, rel=1e-6)


@pytest.mark.parametrize("cells,runs", [(125, 20_000), (125, 3_000), ("depth", RUNS)])
def test_min_detectable_tv_is_met_in_the_worst_direction(cells, runs):
    """Simulated: counts of ``runs`` draws from the distribution moved by the stated size in
    the direction the test sees least are rejected about 95% of the time (2,000 trials;
    the noncentral chi-square is a first-order approximation, so allow 90-99%). Random
    distributions over 125 cells, and the engine test's 1,093 outcomes at its default size
    (most of them pooled)."""
    rng = np.random.default_rng(runs)
    if cells == "depth":
        probs = np.array(list(exact(T1).values()))
    else:
        probs = rng.dirichlet(np.full(cells, 0.7))
    alpha = 0.001
    tv = min_detectable_tv(probs, runs, alpha)
    wrong = worst_direction(probs, runs, tv)
    assert wrong.min() >= 0 and wrong.sum() == pytest.approx(1.0)
    keys = {i: float(x) for i, x in enumerate(probs)}
    assert pooled_tv(keys, {i: float(x) for i, x in enumerate(wrong)}, runs) == pytest.approx(tv)
    trials = rng.multinomial(runs, wrong, size=2000)
    rejected = np.mean([chisquare(t, probs)[0] < alpha for t in trials])
    assert 0.90 <= rejected <= 0.99, (tv, rejected)
    # and a correct sampler is rejected about alpha of the time
    right = rng.multinomial(runs, probs, size=2000)
    assert np.mean([chisquare(t, probs)[0] < alpha for t in right]) <= 0.005


def test_pooling_matches_the_chi2_of_the_verifier_tests():
    counts = np.array([50, 30, 3, 1, 0, 16])
    probs = np.array([0.5, 0.3, 0.02, 0.02, 0.01, 0.15])
    pvalue, stat, df = chisquare(counts, probs)
    # cells 2, 3, 4 (expected 2, 2, 1) pooled: observed 4 against 5
    assert df == 3
    assert stat == pytest.approx(0 + 0 + 0.2 + 1 / 15)
    assert pvalue == pytest.approx(
        float(
            torch.special.gammaincc(torch.tensor(1.5), torch.tensor(stat / 2, dtype=torch.float64))
        )
    )
