"""Training Medusa heads on this machine: ``specdec train medusa``.

The stages of ``specdec train eagle`` (`specdec.train.eagle`), on the same feature
stores: sequences from the corpus with the target's own answers, the target's last
hidden state at every position on disk (an EAGLE-1 head's store of the same data is
read as it is, not computed again), the draft vocabulary of the store's most frequent
tokens. Then epochs: head k (from 0) at position t is trained towards the target's
own distribution of the token k + 2 places on (the target's logits at t + k + 1, over
the draft vocabulary: self-distillation, as Medusa trains on the model's own outputs),
cross-entropy weighted 0.8^k (the authors' decay), AdamW; a checkpoint each
``checkpoint_s`` and at the end, a resumed run equal to an uninterrupted one. Last, on
held-out sequences, how often each head's i-th likeliest token was the target's: the
accuracies the drafter's static tree is built from, written with the heads.

Deviation from Medusa-1: only the residual blocks are trained; the heads share the
target's frozen LM head (`specdec.models.medusa_heads`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import head_folder, head_rows
from specdec.models.medusa_heads import MedusaHeads
from specdec.speculation.drafters.base import layer_features
from specdec.train import eagle as shared
from specdec.train.loop import check_budget, prepare, record, run_epochs


@dataclass(frozen=True)
class MedusaTrainConfig(shared.ReadsAStore):
    data: str = "prompts,python"
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    minutes: float | None = 30.0
    tokens: int | None = None  # or: training tokens (sequence tokens x heads)
    feature_tokens: int = 150_000
    seq_len: int = 512
    respond: int = 128
    draft_vocab: int = 32768
    lr: float = 1e-3  # Medusa-1's
    decay: float = 0.8  # head k's loss weighs decay^k
    weight_decay: float = 0.0  # AdamW's (Medusa-1: none)
    top_k: int = 10  # ranks whose accuracy is measured (the tree's widest choice)
    held_out: float = 0.05
    checkpoint_s: float = 60.0
    seed: int = 0

    def check(self) -> None:
        check_budget(self)
        if self.num_heads < 1 or self.num_layers < 1 or self.top_k < 1:
            raise InvalidRequestError("--heads, --layers and --top-k must be >= 1")
        if not 0 < self.decay <= 1 or self.lr <= 0 or self.draft_vocab < 1:
            raise InvalidRequestError("--decay must be in (0, 1], --lr and --draft-vocab > 0")
        self.features().check()



def sequence_loss(
    heads: MedusaHeads,
    target,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    decay: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss on one sequence (``hidden``: the target's last-layer states, rows, d) and
    per head the rank of the target's likeliest token among the head's logits, at each
    position where that token is in the sequence. ``weight``: the target's LM-head rows
    at the draft vocabulary."""
    last = hidden.float()
    with torch.no_grad():
        want = F.linear(target.norm(last), weight).log_softmax(-1)  # the target's, per row
        best = want.argmax(-1)
    out = heads(target, last)  # (rows, K, d)
    n = last.shape[0]
    loss = last.new_zeros(())
    ranks = []
    for k in range(min(heads.num_heads, n - 1)):
        # head k at t guesses the token the target's row t + k + 1 predicts
        logits = F.linear(out[: n - k - 1, k], weight)
        logp = logits.log_softmax(-1)
        loss = loss + decay**k * -(want[k + 1 :].exp() * logp).sum(-1).mean()
        with torch.no_grad():
            right = logits.gather(-1, best[k + 1 :, None])
            ranks.append((logits > right).sum(-1))
    return loss, ranks


def train(gen, cfg: MedusaTrainConfig, **kw) -> dict[str, Any]:
    """Train Medusa heads (`train_heads`: ``out``, ``work``, ``resume``, ``progress``)."""

    def loss(heads, model, weight, tokens, last, generator, done):
        return sequence_loss(heads, model, weight, last, cfg.decay)

    return train_heads(gen, cfg, MedusaHeads, loss, **kw)


def train_heads(
    gen,
    cfg: MedusaTrainConfig,
    heads_class,
    loss: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]],
    *,
    out: Path | None = None,
    work: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    head_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a head set of ``heads_class`` (a `HeadSet`: Medusa's or a sequential kind's)
    for ``gen``'s target (a loaded `specdec.api.Generator`, native backend) and write it
    to ``out`` (default: the model's folder of its kind); returns how it was trained and
    its held-out accuracies. The steps every such kind shares: the data stages
    (`prepare`), new heads (``heads_class.for_target``, with ``head_options``), AdamW over ``loss(heads, target,
    weight, tokens, last, generator, done)`` per stored sequence (``last``: the target's
    last-layer states; the generator seeded per sequence and epoch, None when held
    out; ``done``: the share of the budget spent), the held-out rank accuracies."""
    kind = heads_class.config_class.kind
    cfg.check()
    out = Path(out) if out else head_folder(gen.name, kind)
    run = prepare(
        gen,
        cfg.features(),
        kind=kind,
        out=out,
        work=work,
        resume=resume,
        progress=progress,
        draft_vocab=cfg.draft_vocab,
        held_out=cfg.held_out,
    )
    model = gen.target.model
    heads = heads_class.for_target(
        model, gen.name, cfg.num_heads, cfg.num_layers, run.d2t, seed=cfg.seed,
        **(head_options or {}),
    )
    weight = head_rows(model, heads.d2t).float()
    opt = torch.optim.AdamW(
        heads.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    n_layers = model.config.num_layers
    have = shared.stored_layers(1, n_layers)

    def sequence(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, hidden = run.store.sequence(i)
        return tokens, layer_features(hidden, have, (n_layers,))

    def step(i: int, epoch: int, done: float) -> tuple[torch.Tensor, int]:
        tokens, last = sequence(i)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 1_000_003 + i)
        value, _ = loss(heads, model, weight, tokens, last, g, done)
        return value, last.shape[0] * cfg.num_heads

    pos = run_epochs(heads, opt, step, run, cfg, resume=resume, progress=progress, kind=kind)
    with torch.no_grad():
        results = [loss(heads, model, weight, *sequence(i), None, 1.0) for i in run.eval_ids]
    evaluation = rank_accuracy(results, cfg.num_heads, cfg.top_k)
    heads.config.accuracy = evaluation.pop("accuracy")
    heads.config.training = record(cfg, run, pos, evaluation)
    heads.save(out)
    return heads.config.training


@torch.no_grad()
def evaluate(heads, model, weight, sequences: list[torch.Tensor], cfg: MedusaTrainConfig):
    """On held-out sequences: per head, how often the target's likeliest token was the
    head's i-th likeliest (i < top_k), and its top-1 and top-k accuracies."""
    results = [sequence_loss(heads, model, weight, hidden, cfg.decay) for hidden in sequences]
    return rank_accuracy(results, cfg.num_heads, cfg.top_k)


def rank_accuracy(results: list[tuple[torch.Tensor, list[torch.Tensor]]], heads: int, top_k: int):
    """From each held-out sequence's (loss, ranks per head): per head, how often the
    target's likeliest token was the head's i-th likeliest (i < top_k), top-1 and top-k
    accuracies, the mean loss."""
    counts = [[0] * top_k for _ in range(heads)]
    seen = [0] * heads
    for _, ranks in results:
        for k, r in enumerate(ranks):
            seen[k] += r.numel()
            for i in range(top_k):
                counts[k][i] += int((r == i).sum())
    accuracy = [[c / s if s else 0.0 for c in row] for row, s in zip(counts, seen, strict=True)]
    return {
        "sequences": len(results),
        "accuracy": [[round(a, 4) for a in row] for row in accuracy],
        "top1_by_head": [round(row[0], 4) for row in accuracy],
        f"top{top_k}_by_head": [round(sum(row), 4) for row in accuracy],
        "loss": round(sum(float(loss) for loss, _ in results) / max(1, len(results)), 4),
    }
