"""Training Clover heads on this machine: ``specdec train clover``.

The data stages are Medusa's (`specdec.train.medusa`): the EAGLE-1 feature store of the
same data is read as it is. Then epochs, per stored sequence: the augmenting block over
the target's last-layer states (causal, `CloverHeads.prefix_states`) gives each
position's first chain state; depth k (from 0) at position t folds in the vector of the
sequence's token t + k + 1 (teacher forcing: the path drafting would have taken had
every guess before it been right) and is trained towards the target's own distribution
of the token after it (its logits at t + k + 1), cross-entropy weighted 0.8^k, AdamW at
Clover-1's learning rate 1e-3. A checkpoint each ``checkpoint_s`` and at the end; a
resumed run equals an uninterrupted one. Last, on held-out sequences, how often each
head's i-th likeliest token was the target's: the accuracies the drafter's static tree is
built from, written with the heads.

Deviations from Clover-1: the paper gives no loss (this is Medusa's distillation loss);
a constant learning rate (the paper decays it on a cosine); trained on a CPU's worth of
data (`specdec.models.clover_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdec.models.clover_heads import CloverHeads
from specdec.train.medusa import MedusaTrainConfig, train_heads


@dataclass(frozen=True)
class CloverTrainConfig(MedusaTrainConfig):
    num_heads: int = 3  # Clover-1's


def sequence_loss(
    heads: CloverHeads,
    target,
    weight: torch.Tensor,
    vectors: torch.Tensor,
    t2d: torch.Tensor,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    decay: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss on one sequence (``tokens``, ``hidden``: the target's last-layer states,
    rows, d) and per head the rank of the target's likeliest token among the head's
    logits at each position where it is in the sequence. ``weight``: the target's
    LM-head rows at the draft vocabulary, ``vectors`` its token vectors, ``t2d`` a target
    id's row among them (-1: outside)."""
    last = hidden.float()
    with torch.no_grad():
        want = F.linear(target.norm(last), weight).log_softmax(-1)  # the target's, per row
        best = want.argmax(-1)
        at = t2d[tokens]
        e = vectors[at.clamp(min=0)] * (at >= 0)[:, None]
    s = heads.prefix_states(target, last)
    n = last.shape[0]
    loss = last.new_zeros(())
    ranks = []
    for k in range(min(heads.num_heads, n - 1)):
        m = n - k - 1  # positions t with a token t + k + 2 in the sequence
        out, s = heads.step(k, s[:m], e[k + 1 : k + 1 + m])
        logits = F.linear(out, weight)
        logp = logits.log_softmax(-1)
        loss = loss + decay**k * -(want[k + 1 :].exp() * logp).sum(-1).mean()
        with torch.no_grad():
            right = logits.gather(-1, best[k + 1 :, None])
            ranks.append((logits > right).sum(-1))
    return loss, ranks


def train(gen, cfg: CloverTrainConfig, **kw) -> dict[str, Any]:
    """Train Clover heads (`train_heads`: ``out``, ``work``, ``resume``, ``progress``)."""
    maps: dict[str, torch.Tensor] = {}

    def loss(heads, model, weight, tokens, last, generator, done):
        if not maps:  # the draft vocabulary's vectors, once
            maps["vectors"] = CloverHeads.token_vectors(weight)
            t2d = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
            t2d[heads.d2t] = torch.arange(heads.d2t.numel())
            maps["t2d"] = t2d
        return sequence_loss(
            heads, model, weight, maps["vectors"], maps["t2d"], tokens, last, cfg.decay
        )

    return train_heads(gen, cfg, CloverHeads, loss, **kw)
