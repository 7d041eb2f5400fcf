"""The divergences a draft model is distilled with (DistillSpec, Zhou et al. 2024), from
the target's and the draft's logits at the same positions.

Each is computed exactly over the vocabulary at every position (white-box distillation)
and returned per position; a trainer averages them over a sequence's scored positions.
``p`` is the target's distribution, ``q`` the draft's:

- ``fkl``: KL(p ‖ q) = Σ p (log p − log q), mass-covering;
- ``rkl``: KL(q ‖ p) = Σ q (log q − log p), mode-seeking;
- ``jsd``: the generalised Jensen-Shannon divergence of GKD, β KL(p ‖ m) + (1 − β)
  KL(q ‖ m) with m = β p + (1 − β) q (β = 0.5: the usual JSD; it tends to β·fkl as β → 0
  and to (1 − β)·rkl as β → 1);
- ``tvd``: the total variation distance ½ Σ |p − q| = 1 − Σ min(p, q): one minus the
  probability that speculative sampling accepts a token drafted from q, so minimising it
  maximises acceptance directly.

Both distributions are taken at ``temperature`` (the decoding temperature whose
acceptance the draft should raise; 1 by default).
"""

from __future__ import annotations

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def divergence(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``kind`` between the target's and the draft's distributions at each position
    (logits (..., vocab) of the same shape): (...,). Gradients flow into the draft's logits
    only."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}: one of {', '.join(DIVERGENCES)}")
    if not 0 < beta < 1:
        raise ValueError(f"the JSD's beta must be in (0, 1), got {beta}")
    if target_logits.shape != draft_logits.shape:
        raise ValueError(
            f"target and draft logits differ in shape: {tuple(target_logits.shape)} "
            f"vs {tuple(draft_logits.shape)}"
        )
    log_p = (target_logits.detach() / temperature).log_softmax(-1)
    log_q = (draft_logits / temperature).log_softmax(-1)
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    m = beta * log_p.exp() + (1 - beta) * log_q.exp()
    log_m = m.clamp_min(torch.finfo(m.dtype).tiny).log()  # finite where m is 0 (no term there)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per position from log-probabilities; a zero-probability term is zero."""
    a = log_a.exp()
    # the log-ratio zeroed where a is: no 0 · inf (nor its NaN gradient)
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))).sum(-1)


def acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float = 1.0):
    """Σ min(p, q) per position: how often speculative sampling at ``temperature`` keeps a
    token the draft samples there (at temperature 0: whether the two argmaxes agree)."""
    if temperature == 0:
        return (target_logits.argmax(-1) == draft_logits.argmax(-1)).to(target_logits.dtype)
    p = (target_logits / temperature).softmax(-1)
    q = (draft_logits / temperature).softmax(-1)
    return torch.minimum(p, q).sum(-1)
