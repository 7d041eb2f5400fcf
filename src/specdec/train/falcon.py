"""Training a Falcon drafter on this machine: ``specdec train falcon``.

The data stages are Medusa's (`specdec.train.medusa`): the EAGLE-1 feature store of the
same data is read as it is. Then epochs of Falcon's coupled sequential glancing
distillation (CSGD), per stored sequence (`glanced_loss`):

1. a pass without gradients over the sequence's slots (the relaxed causal mask, blocks
   of k at a random phase) counts the Hamming distance d: the slots whose likeliest
   token differs from the target's;
2. ``N = lambda * d`` block-start slots, chosen at random, read instead what the slot k
   places on reads (its token and the feature before it: the ground truth the slot is
   to predict), so that the rest of their block glances at it; lambda falls linearly
   from ``glance_start`` to ``glance_end`` over the run;
3. a pass with gradients on those inputs; the loss, on the slots not glanced, is
   Falcon's: SmoothL1 between each slot's predicted feature and the target's ``f_{s+k-1}``, plus 0.1 × (0.9 × the
   target's distribution against the drafter's at temperature 0.95 (the authors' KL
   form) + 0.1 × cross-entropy to a token drawn from the target's distribution).

Input features get uniform noise in ±``noise`` (the paper's U(-0.1, 0.1)). A checkpoint
each ``checkpoint_s`` and at the end; a resumed run equals an uninterrupted one. Last,
on held-out sequences, drafting as it runs (`drafting_outputs`: every pass, the path
teacher-forced) gives each depth's accuracy per rank: the tree's numbers.

Deviations from Falcon: glanced slots are the blocks' first slots (the authors' code
strides the reply's tokens from its start, not from the blocks'), N is capped at their
count (the code skips such a sequence), and glanced slots are left out of the loss, as
GLAT leaves them (the code keeps them, where their target is their own input feature); a learning rate of 3e-4 without warm-up
(theirs: 3e-5 over 20 epochs of ShareGPT on a GPU); gradients clipped by norm 1 (theirs:
by value 0.5); trained on a CPU's worth of data (`specdec.models.falcon_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdec.errors import InvalidRequestError
from specdec.models.falcon_heads import (
    FalconHeads,
    drafting_outputs,
    sequence_outputs,
    slot_rows,
)
from specdec.train.medusa import MedusaTrainConfig, train_heads


@dataclass(frozen=True)
class FalconTrainConfig(MedusaTrainConfig):
    num_heads: int = 4  # drafting depths: two passes of k = 2
    block: int = 2  # k: tokens per pass (the paper's best)
    lr: float = 3e-4
    glance_start: float = 0.45  # lambda at the start and at the end (the authors' code)
    glance_end: float = 0.1
    noise: float = 0.1  # uniform noise on the input features
    temperature: float = 0.95  # of the soft loss
    token_weight: float = 0.1  # of the token losses beside the feature loss
    soft: float = 0.9  # the soft loss's share of the token losses

    def check(self) -> None:
        super().check()
        if self.block < 1:
            raise InvalidRequestError(f"--block must be >= 1, got {self.block}")
        if not 0 <= self.glance_end <= self.glance_start <= 1:
            raise InvalidRequestError("--glance must be two shares, 0 <= END <= START <= 1")
        if self.noise < 0:
            raise InvalidRequestError(f"--noise must be >= 0, got {self.noise:g}")


def glanced_slots(
    starts: torch.Tensor, count: int, block: int, generator: torch.Generator
) -> torch.Tensor:
    """The slots whose inputs are replaced: ``count`` of the candidate block ``starts``
    at random (block 2); for larger blocks ``count // block`` starts, each with a random
    run of up to ``block - 2`` slots after it (the authors' rule)."""
    if block > 2:
        count //= block
    picked = starts[torch.randperm(len(starts), generator=generator)[: min(count, len(starts))]]
    if block <= 2 or not len(picked):
        return picked
    runs = torch.randint(0, block - 1, (len(picked),), generator=generator)
    extra = [int(s) + j + 1 for s, r in zip(picked, runs, strict=True) for j in range(int(r))]
    return torch.cat([picked, torch.tensor(extra, dtype=torch.long)])


def glanced_loss(
    heads: FalconHeads,
    target,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    cfg: FalconTrainConfig,
    generator: torch.Generator | None,
    done: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CSGD loss on one sequence (``tokens``, ``hidden``: the target's last-layer
    states) at ``done`` of the run, and, held out (``generator`` None: no glancing, no
    noise, the expected cross-entropy), per depth the rank of the target's likeliest
    token among the drafter's logits as drafting computes them."""
    k = heads.block
    normed = target.norm(hidden.float()).to(heads.dtype)
    n = normed.shape[0]
    rows = n - k + 1  # slot s predicts f_{s+k-1}: rows 0 .. n - k have a target
    if rows < 1:
        return normed.new_zeros((), requires_grad=True), []
    want = normed[k - 1 :]
    with torch.no_grad():
        want_logits = F.linear(want, weight)
        p = want_logits.softmax(-1)
    embeds, before = slot_rows(heads, target, tokens, normed)
    scored = torch.ones(rows, dtype=torch.bool)  # a glanced slot's target is its own input
    phase = 0
    if generator is not None:
        phase = int(torch.randint(0, k, (1,), generator=generator))
        noise = torch.rand(before.shape, generator=generator, dtype=before.dtype)
        before = before + (2 * noise - 1) * cfg.noise
        starts = torch.arange(rows)
        starts = starts[((starts + phase) % k == 0) & (starts + k < n)]
        share = cfg.glance_start - (cfg.glance_start - cfg.glance_end) * done
        if k > 1 and share > 0 and len(starts):
            with torch.no_grad():
                first = sequence_outputs(heads, embeds, before, phase)[:rows]
                wrong = int((F.linear(first, weight).argmax(-1) != want_logits.argmax(-1)).sum())
            slots = glanced_slots(starts, int(share * wrong), k, generator)
            if len(slots):
                embeds, before = embeds.clone(), before.clone()
                embeds[slots], before[slots] = embeds[slots + k], before[slots + k]
                scored[slots] = False
    out = sequence_outputs(heads, embeds, before, phase)[:rows]
    logits = F.linear(out, weight)
    logp = logits.log_softmax(-1)
    t = cfg.temperature
    soft = (p * ((want_logits / t).log_softmax(-1) - (logits / t).log_softmax(-1))).sum(-1)
    if generator is not None:
        drawn = torch.multinomial(p, 1, generator=generator)
        hard = -logp.gather(-1, drawn)[:, 0]
    else:
        hard = -(p * logp).sum(-1)
    tokens_loss = cfg.soft * soft[scored].mean() + (1 - cfg.soft) * hard[scored].mean()
    feature_loss = F.smooth_l1_loss(out[scored], want[scored])
    loss = feature_loss + cfg.token_weight * tokens_loss
    ranks = []
    if generator is None:
        with torch.no_grad():
            best = F.linear(normed, weight).argmax(-1)
            for r, h in enumerate(drafting_outputs(heads, target, tokens, normed)):
                scores = F.linear(h, weight)
                right = scores.gather(-1, best[k - 1 + r : k - 1 + r + h.shape[0], None])
                ranks.append((scores > right).sum(-1))
    return loss, ranks


def train(gen, cfg: FalconTrainConfig, **kw) -> dict[str, Any]:
    """Train a Falcon drafter (`train_heads`: ``out``, ``work``, ``resume``, ``progress``)."""

    def loss(heads, model, weight, tokens, last, generator, done):
        return glanced_loss(heads, model, weight, tokens, last, cfg, generator, done)

    return train_heads(gen, cfg, FalconHeads, loss, head_options={"block": cfg.block}, **kw)
