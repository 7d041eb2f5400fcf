"""Drafting without replacement: Gumbel-Top-k siblings and stochastic beam search.

Recursive Speculative Decoding (RSD; Jeon et al. 2024, "Recursive Speculative
Decoding: Accelerating LLM Inference via Sampling Without Replacement") drafts
the siblings of a tree node *without replacement*, so no two siblings repeat a
token:

- RSD-C (constant branching): the ``k`` children of a node are the first ``k``
  draws without replacement from the drafter's ``q``, made in one go with the
  Gumbel-Top-k trick (Kool et al. 2019, "Stochastic Beams and Where to Find
  Them"): perturb ``log q`` with i.i.d. Gumbel noise and take the ``k`` largest,
  in order. `gumbel_top_k`.
- RSD-S (stochastic beam search): the ``W`` sequences of the next depth are the
  top ``W`` of all children of the current beam under the perturbed log
  probability of the whole sequence, each child's Gumbel truncated so that the
  largest child of a node equals its parent's perturbed value (Kool et al.
  2019, stochastic beam search). `beam_level`.

The ``i``-th sibling drawn without replacement is a draw from ``q`` with the
``i - 1`` earlier siblings removed and renormalised (`conditionals`). With that
distribution as the node's ``q``, the tree is verified exactly by the plain
recursive rejection sampler (`specdec.speculation.verifiers.speculative`); RSD needs no
verifier of its own (see that module's docstring for why the rule stays exact).
"""

from __future__ import annotations

import math

import torch


def gumbel(
    shape: torch.Size | tuple[int, ...], device, rng: torch.Generator | None
) -> torch.Tensor:
    """Standard Gumbel noise (float64): ``-log(E)`` with ``E`` exponential(1)."""
    if rng is not None:
        device = rng.device
    e = torch.empty(shape, dtype=torch.float64, device=device).exponential_(generator=rng)
    return -e.log()


def conditionals(q: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """The distribution each of ``tokens`` (draws without replacement, in order) was drawn
    from: ``q`` without the earlier ones, renormalised (the first: ``q`` itself)."""
    q = q.detach()
    out = [q][: len(tokens)]
    rest = q.clone()
    for token in tokens[:-1]:
        rest[token] = 0
        out.append(rest / rest.sum())
    return out


def gumbel_top_k(
    q: torch.Tensor, k: int, rng: torch.Generator | None
) -> tuple[list[int], list[torch.Tensor]]:
    """``k`` draws without replacement from ``q`` (fewer if ``q`` has fewer tokens with
    probability > 0), in draw order, and the distribution each was drawn from.

    The order matters: the ``i``-th largest perturbed ``log q + Gumbel`` is the
    ``i``-th draw of sequential sampling without replacement.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    work = q.detach().to(rng.device if rng is not None else q.device, torch.float64)
    keys = work.log() + gumbel(work.shape, work.device, rng)
    top = torch.topk(keys, min(k, keys.shape[-1]))
    keep = top.values.tolist()
    tokens = [t for t, key in zip(top.indices.tolist(), keep, strict=True) if key > -math.inf]
    return tokens, conditionals(q, tokens)


def truncated_gumbel(g: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Rows of Gumbels ``g`` (..., V) shifted so that each row's maximum becomes ``top`` (...):
    ``-log(exp(-top) - exp(-max) + exp(-g))`` (Kool et al. 2019), computed with
    ``logaddexp`` and ``expm1``. The order within a row is kept; ``-inf`` stays ``-inf``."""
    z = g.amax(-1, keepdim=True)
    # log(1 - exp(g - z)) by expm1: its rounding is absolute, and it is added to -g
    return -torch.logaddexp(-top.unsqueeze(-1), torch.log(-torch.expm1(g - z)) - g)


def beam_level(
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    scores: torch.Tensor,
    width: int,
    rng: torch.Generator | None,
    noise: bool = True,
) -> list[tuple[int, int, float, float]]:
    """One level of stochastic beam search (Kool et al. 2019).

    ``log_q`` (B, V): the drafter's log distribution after each of the ``B``
    sequences of the beam; ``log_p`` (B,): their log probabilities;
    ``scores`` (B,): their perturbed log probabilities (0 for the root). Returns
    the ``width`` best children, best first, as ``(beam index, token, log
    probability, perturbed score)``. Within one parent the kept children are its
    first draws without replacement from its ``q`` (truncation keeps each
    parent's order). ``noise=False`` is plain beam search (scores are log
    probabilities).
    """
    log_q = log_q.detach().to(torch.float64)
    device = rng.device if (noise and rng is not None) else log_q.device
    log_q = log_q.to(device)
    phi = log_p.to(device, torch.float64).unsqueeze(-1) + log_q
    if noise:
        g = phi + gumbel(phi.shape, device, rng)
        g = truncated_gumbel(g, scores.to(device, torch.float64))
    else:
        g = phi
    top = torch.topk(g.flatten(), min(width, g.numel()))
    vocab = log_q.shape[-1]
    lp = phi.flatten()[top.indices].tolist()
    return [
        (i // vocab, i % vocab, lp[r], score)
        for r, (i, score) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        if score > -math.inf
    ]
