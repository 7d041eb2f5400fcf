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

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import head_folder, head_rows
from specdec.models.medusa_heads import MedusaHeads
from specdec.speculation.drafters.base import layer_features
from specdec.train import eagle as shared
from specdec.train.eagle import Meter, Position, draft_tokens, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class MedusaTrainConfig:
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
    top_k: int = 10  # ranks whose accuracy is measured (the tree's widest choice)
    held_out: float = 0.05
    checkpoint_s: float = 60.0
    seed: int = 0

    def check(self) -> None:
        if self.minutes is not None and self.minutes <= 0:
            raise InvalidRequestError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.tokens is not None and self.tokens <= 0:
            raise InvalidRequestError(f"--tokens must be > 0, got {self.tokens}")
        if self.num_heads < 1 or self.num_layers < 1 or self.top_k < 1:
            raise InvalidRequestError("--heads, --layers and --top-k must be >= 1")
        if not 0 < self.decay <= 1 or self.lr <= 0 or self.draft_vocab < 1:
            raise InvalidRequestError("--decay must be in (0, 1], --lr and --draft-vocab > 0")
        self.features().check()

    def features(self) -> shared.TrainConfig:
        """The feature stage's settings, as an EAGLE-1 run of the same data has them."""
        return shared.TrainConfig(
            data=self.data,
            version=1,
            feature_tokens=self.feature_tokens,
            seq_len=self.seq_len,
            respond=self.respond,
        )


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


def train(
    gen,
    cfg: MedusaTrainConfig,
    *,
    out: Path | None = None,
    work: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train Medusa heads for ``gen``'s target (a loaded `specdec.api.Generator`, native
    backend) and write them to ``out`` (default: the model's 'medusa' head folder).
    Returns how they were trained and their held-out accuracies."""
    cfg.check()
    from specdec.models.target import NativeTarget

    if not isinstance(gen.target, NativeTarget):
        raise InvalidRequestError("training heads needs the native backend (--backend native)")
    model = gen.target.model
    out = Path(out) if out else head_folder(gen.name, "medusa")
    work = Path(work) if work else out.with_name(out.name + "-work")
    if not resume and work.exists():
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    fcfg = cfg.features()
    store, key = shared.open_store(gen, fcfg, work, out.parent)
    t0 = time.perf_counter()
    donors = shared.answer_donors(out.parent, store.identity, store)
    shared.compute_features(gen, store, fcfg, progress, donors, kind="medusa")
    feature_s = time.perf_counter() - t0

    n_eval = max(1, int(round(len(store) * cfg.held_out)))
    train_ids = list(range(len(store) - n_eval))
    eval_ids = list(range(len(store) - n_eval, len(store)))
    vocab_file = work / f"draft-vocab-{key}.json"
    if resume and vocab_file.exists():
        d2t = torch.tensor(json.loads(vocab_file.read_text()), dtype=torch.long)
    else:
        d2t = draft_tokens(
            store, model.config.vocab_size, cfg.draft_vocab, gen.tokenizer.eos_token_ids
        )
        vocab_file.write_text(json.dumps(d2t.tolist()))
    heads = MedusaHeads.for_target(model, gen.name, cfg.num_heads, cfg.num_layers, d2t)
    weight = head_rows(model, heads.d2t).float()
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    pos = (load_checkpoint(work / "checkpoint", heads, opt) if resume else None) or Position()
    layers = shared.stored_layers(1, model.config.num_layers)

    def last_layer(i: int) -> torch.Tensor:
        _, hidden = store.sequence(i)
        return layer_features(hidden, layers, (model.config.num_layers,))

    budget_tokens = cfg.tokens or math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None and cfg.tokens is None else math.inf
    by_tokens = budget_tokens < math.inf
    meter = Meter(
        "epochs",
        budget_tokens if by_tokens else budget_s,
        "tokens" if by_tokens else "s",
        progress,
        kind="medusa",
    )
    last_save = time.perf_counter()
    run_start = time.perf_counter() - pos.seconds
    recent: list[float] = []
    with torch.enable_grad():
        while pos.trained_tokens < budget_tokens and pos.seconds < budget_s:
            order = shared.epoch_order(len(train_ids), cfg.seed, pos.epoch)
            if pos.index >= len(order):
                pos.epoch, pos.index = pos.epoch + 1, 0
                continue
            hidden = last_layer(train_ids[order[pos.index]])
            loss, _ = sequence_loss(heads, model, weight, hidden, cfg.decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            pos.index += 1
            pos.steps += 1
            pos.trained_tokens += hidden.shape[0] * cfg.num_heads
            pos.seconds = time.perf_counter() - run_start
            recent = (recent + [float(loss.detach())])[-50:]
            meter.update(
                pos.trained_tokens if by_tokens else pos.seconds,
                f", {pos.trained_tokens:,} tokens ({pos.trained_tokens / pos.seconds:.0f}/s), "
                f"epoch {pos.epoch + 1}, loss {sum(recent) / len(recent):.3f}",
            )
            if time.perf_counter() - last_save > cfg.checkpoint_s:
                save_checkpoint(work / "checkpoint", heads, opt, pos, cfg)
                last_save = time.perf_counter()
    save_checkpoint(work / "checkpoint", heads, opt, pos, cfg)

    evaluation = evaluate(heads, model, weight, [last_layer(i) for i in eval_ids], cfg)
    heads.config.accuracy = evaluation.pop("accuracy")
    heads.config.training = {
        "data": cfg.data,
        "sequences": len(train_ids),
        "feature_tokens": store.tokens,
        "feature_seconds": round(feature_s, 1),
        "trained_tokens": pos.trained_tokens,
        "train_seconds": round(pos.seconds, 1),
        "epochs": round(pos.epoch + pos.index / max(1, len(train_ids)), 2),
        "config": asdict(cfg),
        "evaluation": evaluation,
        "machine_threads": torch.get_num_threads(),
    }
    heads.save(out)
    return heads.config.training


@torch.no_grad()
def evaluate(heads, model, weight, sequences: list[torch.Tensor], cfg: MedusaTrainConfig):
    """On held-out sequences: per head, how often the target's likeliest token was the
    head's i-th likeliest (i < top_k), and its top-1 and top-k accuracies."""
    counts = [[0] * cfg.top_k for _ in range(cfg.num_heads)]
    seen = [0] * cfg.num_heads
    losses = []
    for hidden in sequences:
        loss, ranks = sequence_loss(heads, model, weight, hidden, cfg.decay)
        losses.append(float(loss))
        for k, r in enumerate(ranks):
            seen[k] += r.numel()
            for i in range(cfg.top_k):
                counts[k][i] += int((r == i).sum())
    accuracy = [[c / s if s else 0.0 for c in row] for row, s in zip(counts, seen, strict=True)]
    return {
        "sequences": len(sequences),
        "accuracy": [[round(a, 4) for a in row] for row in accuracy],
        "top1_by_head": [round(row[0], 4) for row in accuracy],
        f"top{cfg.top_k}_by_head": [round(sum(row), 4) for row in accuracy],
        "loss": round(sum(losses) / max(1, len(losses)), 4),
    }
