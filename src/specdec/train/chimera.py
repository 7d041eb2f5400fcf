"""Training Chimera heads on this machine: ``specdec train chimera``.

The data stages are Medusa's (`specdec.train.medusa`): the EAGLE-1 feature store of the
same data is read as it is. Then epochs, per stored sequence (`sequence_outputs`): the
decoder's keys and values of the target's normed states; for each depth r (from 0) at
position t the trigram ending at token t + r + 1 (teacher forcing: the path drafting
would have taken had every guess before it been right) queries them up to t, and head r
is trained towards the target's own distribution of token t + r + 2 (its logits at
t + r + 1), cross-entropy weighted 0.8^r, AdamW at Chimera's learning rate 2e-4. A
checkpoint each ``checkpoint_s`` and at the end; a resumed run equals an uninterrupted
one. Last, on held-out sequences, how often each head's i-th likeliest token was the
target's: the accuracies the drafter's static tree is built from, written with the heads.

Deviations from Chimera: distillation towards the target's distribution (the authors'
final code: cross-entropy to the data); a constant learning rate (theirs: cosine with
warm-up); trained on a CPU's worth of data (`specdec.models.chimera_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdec.models.chimera_heads import ChimeraHeads, sequence_outputs
from specdec.train.medusa import MedusaTrainConfig, train_heads


@dataclass(frozen=True)
class ChimeraTrainConfig(MedusaTrainConfig):
    lr: float = 2e-4  # Chimera's


def sequence_loss(
    heads: ChimeraHeads,
    target,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    decay: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss on one sequence (``tokens``, ``hidden``: the target's last-layer states,
    rows, d) and per head the rank of the target's likeliest token among the head's
    logits at each position where it is in the sequence. ``weight``: the target's
    LM-head rows at the draft vocabulary."""
    last = hidden.float()
    with torch.no_grad():
        want = F.linear(target.norm(last), weight).log_softmax(-1)  # the target's, per row
        best = want.argmax(-1)
    loss = last.new_zeros(())
    ranks = []
    for r, out in enumerate(sequence_outputs(heads, target, tokens, last)):
        logits = F.linear(out, weight)
        logp = logits.log_softmax(-1)
        loss = loss + decay**r * -(want[r + 1 :].exp() * logp).sum(-1).mean()
        with torch.no_grad():
            right = logits.gather(-1, best[r + 1 :, None])
            ranks.append((logits > right).sum(-1))
    return loss, ranks


def train(gen, cfg: ChimeraTrainConfig, **kw) -> dict[str, Any]:
    """Train Chimera heads (`train_heads`: ``out``, ``work``, ``resume``, ``progress``)."""

    def loss(heads, model, weight, tokens, last, generator, done):
        return sequence_loss(heads, model, weight, tokens, last, cfg.decay)

    return train_heads(gen, cfg, ChimeraHeads, loss, **kw)
