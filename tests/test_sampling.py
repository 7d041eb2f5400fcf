"""One sampling rule for target and drafters: equal to transformers' logits warpers."""

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec.errors import InvalidRequestError
from specdec.speculation.sampling import SamplingParams, probabilities, sample


@pytest.mark.parametrize(
    "t,k,p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9), (1.0, 3, 0.5), (2.0, 1, 1.0)],
)
def test_matches_transformers_warpers(t, k, p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50, dtype=torch.float64) * 3
    ref = TemperatureLogitsWarper(t)(None, logits.clone())
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    got = probabilities(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
    torch.testing.assert_close(got, ref.softmax(-1), rtol=0, atol=1e-12)


def test_greedy_is_one_hot():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert probabilities(logits, SamplingParams()).tolist() == [[0.0, 1.0, 0.0]]


def test_sample_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(probs, g) for _ in range(20000)]), minlength=3)
    # chi-square with 2 degrees of freedom; 13.8 is the 0.001 critical value
    chi2 = (((counts - 20000 * probs) ** 2) / (20000 * probs)).sum()
    assert chi2 < 13.8


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)]
)
def test_bad_params(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)
