"""The distillation divergences against values computed by hand on a small distribution,
their limits, their gradients, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from specdec.train.divergences import acceptance, divergence

P = [0.5, 0.3, 0.2]  # the target's
Q = [0.2, 0.5, 0.3]  # the draft's


def logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def by_hand(kind: str, beta: float = 0.5) -> float:
    """The divergence written out term by term."""
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    if kind == "fkl":
        return kl(P, Q)
    if kind == "rkl":
        return kl(Q, P)
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(P, Q, strict=True))
    m = [beta * x + (1 - beta) * y for x, y in zip(P, Q, strict=True)]
    return beta * kl(P, m) + (1 - beta) * kl(Q, m)


@pytest.mark.parametrize(
    "kind, beta, value",
    [
        ("fkl", 0.5, 0.223805),  # 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3)
        ("rkl", 0.5, 0.193794),
        ("jsd", 0.5, 0.050875),
        ("jsd", 0.1, 0.019661),
        ("jsd", 0.9, 0.017563),
        ("tvd", 0.5, 0.3),
    ],
)
def test_each_divergence_is_its_hand_computed_value(kind, beta, value):
    got = float(divergence(logits(P), logits(Q), kind, beta=beta))
    assert got == pytest.approx(by_hand(kind, beta), abs=1e-12)
    assert got == pytest.approx(value, abs=1e-6)


def test_limits_and_acceptance():
    """JSD tends to beta·FKL and to (1 - beta)·RKL at its ends; TVD = 1 - acceptance;
    each is zero on equal distributions, also with zero-probability tokens."""
    p, q = logits(P), logits(Q)
    fkl, rkl = float(divergence(p, q, "fkl")), float(divergence(p, q, "rkl"))
    assert float(divergence(p, q, "jsd", beta=1e-6)) / 1e-6 == pytest.approx(fkl, rel=1e-4)
    assert float(divergence(p, q, "jsd", beta=1 - 1e-6)) / 1e-6 == pytest.approx(rkl, rel=1e-4)
    assert float(acceptance(p, q)) == pytest.approx(0.7)
    assert float(divergence(p, q, "tvd")) == pytest.approx(1 - float(acceptance(p, q)))
    assert float(acceptance(p, q, temperature=0)) == 0.0  # argmaxes 0 and 1
    zero = torch.tensor([0.0, 1.0, float("-inf")], dtype=torch.float64)
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        assert float(divergence(zero, zero, kind)) == pytest.approx(0.0, abs=1e-12)


def test_temperature_sharpens_both_sides():
    p, q = logits(P), logits(Q)
    t = 0.5
    sharp_p = (p / t).softmax(-1).tolist()
    sharp_q = (q / t).softmax(-1).tolist()
    want = 0.5 * sum(abs(a - b) for a, b in zip(sharp_p, sharp_q, strict=True))
    assert float(divergence(p, q, "tvd", temperature=t)) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_gradients_reach_the_draft_only(kind):
    """Batched over positions; the gradient flows into the draft's logits, none into the
    target's; FKL's gradient is q - p (the soft cross-entropy's); finite beside a token
    the draft gives no probability."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    draft = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    d = divergence(target, draft, kind)
    assert d.shape == (4,) and bool((d >= 0).all())
    d.sum().backward()
    assert target.grad is None and torch.isfinite(draft.grad).all()
    if kind == "fkl":
        want = draft.softmax(-1) - target.softmax(-1)
        assert torch.allclose(draft.grad, want.detach(), atol=1e-12)
    masked = torch.tensor([[0.3, float("-inf"), 1.0]], dtype=torch.float64, requires_grad=True)
    divergence(
        torch.tensor([[0.1, float("-inf"), 0.5]], dtype=torch.float64), masked, kind
    ).sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_bad_input_is_refused_in_one_line():
    p, q = logits(P), logits(Q)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence(p, q, "kl")
    with pytest.raises(ValueError, match="beta must be in"):
        divergence(p, q, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        divergence(p, q[:2], "fkl")
