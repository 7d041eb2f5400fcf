"""Training Hydra++ heads on this machine: ``specdec train hydra``.

The data stages are Medusa's (`specdec.train.medusa`): the EAGLE-1 feature store of the
same data is read as it is. Then epochs, per stored sequence: the prefix layer over the
target's last-layer states (causal, `HydraHeads.prefix_states`); head k at
position t reads the prefix state beside the embeddings of the sequence's tokens t + 1 ..
t + k + 1 (teacher forcing: the path drafting would have taken had every guess before
it been right) and is trained towards the target's own distribution at t + k + 1 (the
token k + 2 places on): Hydra++'s teacher-distillation objective, the heads' losses
summed with equal weights, dropout 0.2 on the heads' inputs and outputs, AdamW with
weight decay 0.1 at Hydra++'s learning rate 5e-4. A checkpoint each ``checkpoint_s`` and
at the end; a resumed run equals an uninterrupted one. Last, on held-out sequences, how
often each head's i-th likeliest token was the target's: the accuracies the drafter's
static tree is built from, written with the heads.

Deviations from Hydra++: a constant learning rate (the authors decay it on a cosine);
the LM head is the target's, frozen, over a draft vocabulary; one block per head by
default (theirs: 4); trained on a CPU's worth of data (`specdec.models.hydra_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdec.errors import InvalidRequestError
from specdec.models.hydra_heads import HydraHeads
from specdec.train.medusa import MedusaTrainConfig, train_heads


@dataclass(frozen=True)
class HydraTrainConfig(MedusaTrainConfig):
    lr: float = 5e-4  # Hydra++'s
    decay: float = 1.0  # the heads' losses weigh the same
    dropout: float = 0.2
    weight_decay: float = 0.1

    def check(self) -> None:
        super().check()
        if not 0 <= self.dropout < 1 or self.weight_decay < 0:
            raise InvalidRequestError("--dropout must be in [0, 1) and --weight-decay >= 0")


def _dropout(x: torch.Tensor, p: float, g: torch.Generator | None) -> torch.Tensor:
    """Dropout drawn from ``g`` (a resumed run draws the same); None: none."""
    if g is None or p == 0:
        return x
    keep = torch.rand(x.shape, generator=g) >= p
    return x * keep / (1 - p)


def sequence_loss(
    heads: HydraHeads,
    target,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    cfg: HydraTrainConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss on one sequence (``tokens``, ``hidden``: the target's last-layer states,
    rows, d) and per head the rank of the target's likeliest token among the head's
    logits at each position where it is in the sequence. ``weight``: the target's
    LM-head rows at the draft vocabulary; ``generator``: dropout's (None: evaluation)."""
    last = hidden.float()
    with torch.no_grad():
        want = F.linear(target.norm(last), weight).log_softmax(-1)  # the target's, per row
        best = want.argmax(-1)
        embeds = target.embed(tokens).float()
    prefix = _dropout(heads.prefix_states(target, last), cfg.dropout, generator)
    n = last.shape[0]
    loss = last.new_zeros(())
    ranks = []
    for k in range(min(heads.num_heads, n - 1)):
        m = n - k - 1  # positions t with a token t + k + 2 in the sequence
        path = torch.stack([embeds[j + 1 : j + 1 + m] for j in range(k + 1)], dim=1)
        out = _dropout(heads.head(k, prefix[:m], path), cfg.dropout, generator)
        logits = F.linear(out, weight)
        logp = logits.log_softmax(-1)
        loss = loss + cfg.decay**k * -(want[k + 1 :].exp() * logp).sum(-1).mean()
        with torch.no_grad():
            right = logits.gather(-1, best[k + 1 :, None])
            ranks.append((logits > right).sum(-1))
    return loss, ranks


def train(gen, cfg: HydraTrainConfig, **kw) -> dict[str, Any]:
    """Train Hydra++ heads (`train_heads`: ``out``, ``work``, ``resume``, ``progress``)."""

    def loss(heads, model, weight, tokens, last, generator, done):
        return sequence_loss(heads, model, weight, tokens, last, cfg, generator)

    return train_heads(gen, cfg, HydraHeads, loss, **kw)
