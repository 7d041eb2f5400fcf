"""What every head trainer shares: the data stages, the epochs with their checkpoints,
and the record written with the head.

A trainer (`specdec.train.eagle`, `medusa`, `hydra`) brings its module, its loss on one
stored sequence and its evaluation; `prepare` gives it the feature store (made once per
model and data, read by every kind of head), the held-out split and the draft
vocabulary; `run_epochs` trains until the budget (minutes or tokens, resumed runs
included), writing a checkpoint (weights, optimiser, position) every ``checkpoint_s``
and at the end, so that a resumed run equals an uninterrupted one; `record` says how the
head was made.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from specdec.errors import InvalidRequestError
from specdec.train.features import FeatureStore


class Meter:
    """Progress of a stage on stderr: a line every ``every`` seconds (and at the end)."""

    def __init__(
        self,
        what: str,
        total: float,
        unit: str,
        enabled: bool,
        every: float = 15.0,
        kind: str = "eagle",
    ):
        self.what, self.total, self.unit = what, total, unit
        self.enabled, self.every, self.kind = enabled, every, kind
        self.start = self.last = time.perf_counter()
        self.done0: float | None = None

    def update(self, done: float, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if self.done0 is None:
            self.done0 = done
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        rate = (done - self.done0) / max(now - self.start, 1e-9)
        eta = (
            f", ETA {_minutes((self.total - done) / rate)}"
            if rate > 0 and done < self.total
            else ""
        )
        print(
            f"specdec: train {self.kind}: {self.what}: {done:,.0f}/{self.total:,.0f} {self.unit} "
            f"({rate:,.0f}/s{eta}){extra}",
            file=sys.stderr,
            flush=True,
        )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class Position:
    epoch: int = 0
    index: int = 0  # sequences of this epoch done
    steps: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0


def check_budget(cfg) -> None:
    """Refuse a run's budget (``cfg.minutes`` or ``cfg.tokens``) unless it is positive."""
    if cfg.minutes is not None and cfg.minutes <= 0:
        raise InvalidRequestError(f"--minutes must be > 0, got {cfg.minutes:g}")
    if cfg.tokens is not None and cfg.tokens <= 0:
        raise InvalidRequestError(f"--tokens must be > 0, got {cfg.tokens}")


def epoch_order(n_train: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_train, generator=g).tolist()


def draft_tokens(store: FeatureStore, vocab: int, n: int, ends: frozenset[int]) -> torch.Tensor:
    """The ``n`` most frequent tokens of the store, and the end tokens (ids increasing)."""
    counts = store.token_counts(vocab).double()
    counts += torch.arange(vocab, 0, -1, dtype=torch.float64) * 1e-9  # ties: lower ids first
    top = torch.topk(counts, min(n, vocab)).indices
    extra = torch.tensor(sorted(e for e in ends if 0 <= e < vocab), dtype=torch.long)
    return torch.unique(torch.cat([top, extra]))


def save_checkpoint(folder: Path, head, opt, pos: Position, cfg) -> None:
    """``head`` (any head with ``save``/``load``), the optimiser's state and the
    position, written whole or not at all."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    head.save(tmp / "head")
    state = opt.state_dict()
    tensors = {}
    for idx, s in state["state"].items():
        for key, value in s.items():
            tensors[f"{idx}.{key}"] = (
                value.detach().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            )
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"position": asdict(pos), "config": asdict(cfg), "param_groups": state["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, head, opt) -> Position | None:
    """Into ``head`` and ``opt``: what `save_checkpoint` wrote; the position (None: no
    checkpoint to read)."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        saved = type(head).load(folder / "head")
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError):
        return None
    head.load_state_dict(saved.state_dict())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return Position(**meta["position"])


@dataclass
class Prepared:
    """What the data stages made for a run."""

    store: FeatureStore
    work: Path  # the run's checkpoints and draft vocabulary
    train_ids: list[int]
    eval_ids: list[int]
    d2t: torch.Tensor  # the draft vocabulary (target ids, increasing)
    feature_s: float  # seconds spent computing features in this run


def run_folder(out: Path, work: Path | None, resume: bool) -> Path:
    """A run's checkpoints folder (``work``, default beside ``out``), its checkpoint gone
    unless the run resumes."""
    work = Path(work) if work else out.with_name(out.name + "-work")
    if not resume and work.exists():
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def held_out_split(n: int, share: float) -> tuple[list[int], list[int]]:
    """The ids of ``n`` sequences to train on and the last ``share`` (at least one) held out."""
    n_eval = max(1, int(round(n * share)))
    return list(range(n - n_eval)), list(range(n - n_eval, n))


def prepare(
    gen,
    features,
    *,
    kind: str,
    out: Path,
    work: Path | None,
    resume: bool,
    progress: bool,
    draft_vocab: int,
    held_out: float,
) -> Prepared:
    """The data stages for a head written to ``out``: the feature store of ``features``
    (an `eagle.TrainConfig`: the data, lengths and layers; one of the same identity under
    the model's heads folder is read as it is), filled to its size; the last
    ``held_out`` share of its sequences kept for evaluation; the ``draft_vocab`` most
    frequent tokens (fixed for the run: a resumed run reads the same)."""
    from specdec.models.target import NativeTarget
    from specdec.train import eagle as stages

    if not isinstance(gen.target, NativeTarget):
        raise InvalidRequestError("training a head needs the native backend (--backend native)")
    model = gen.target.model
    work = run_folder(out, work, resume)
    store, key = stages.open_store(gen, features, work, out.parent)
    t0 = time.perf_counter()
    donors = stages.answer_donors(out.parent, store.identity, store)
    stages.compute_features(gen, store, features, progress, donors, kind=kind)
    feature_s = time.perf_counter() - t0

    train_ids, eval_ids = held_out_split(len(store), held_out)
    vocab_file = work / f"draft-vocab-{key}.json"
    if resume and vocab_file.exists():
        d2t = torch.tensor(json.loads(vocab_file.read_text()), dtype=torch.long)
    else:
        d2t = draft_tokens(store, model.config.vocab_size, draft_vocab, gen.tokenizer.eos_token_ids)
        vocab_file.write_text(json.dumps(d2t.tolist()))
    return Prepared(store, work, train_ids, eval_ids, d2t, feature_s)


def run_epochs(
    head: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: Callable[[int, int], tuple[torch.Tensor, int]],
    prepared: Prepared,
    cfg,
    *,
    resume: bool,
    progress: bool,
    kind: str,
    clip: float = 1.0,
) -> Position:
    """Train ``head`` until ``cfg.tokens`` training tokens or ``cfg.minutes`` (resumed
    runs included). ``step(sequence, epoch, done)`` returns one stored sequence's loss and
    the training tokens it counts (``done``: the share of the budget spent, 0 .. 1); sequences come in a seeded order per epoch. A resumed run
    starts from the checkpoint in ``prepared.work``."""
    folder = prepared.work / "checkpoint"
    pos = (load_checkpoint(folder, head, opt) if resume else None) or Position()
    train_ids = prepared.train_ids
    budget_tokens = cfg.tokens or math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None and cfg.tokens is None else math.inf
    by_tokens = budget_tokens < math.inf
    meter = Meter(
        "epochs",
        budget_tokens if by_tokens else budget_s,
        "tokens" if by_tokens else "s",
        progress,
        kind=kind,
    )
    last_save = time.perf_counter()
    run_start = time.perf_counter() - pos.seconds
    recent: list[float] = []
    head.train()
    with torch.enable_grad():
        while pos.trained_tokens < budget_tokens and pos.seconds < budget_s:
            order = epoch_order(len(train_ids), cfg.seed, pos.epoch)
            if pos.index >= len(order):
                pos.epoch, pos.index = pos.epoch + 1, 0
                continue
            done = max(pos.trained_tokens / budget_tokens, pos.seconds / budget_s)
            loss, tokens = step(train_ids[order[pos.index]], pos.epoch, min(1.0, done))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
            opt.step()
            pos.index += 1
            pos.steps += 1
            pos.trained_tokens += tokens
            pos.seconds = time.perf_counter() - run_start
            recent = (recent + [float(loss.detach())])[-50:]
            meter.update(
                pos.trained_tokens if by_tokens else pos.seconds,
                f", {pos.trained_tokens:,} tokens ({pos.trained_tokens / pos.seconds:.0f}/s), "
                f"epoch {pos.epoch + 1}, loss {sum(recent) / len(recent):.3f}",
            )
            if time.perf_counter() - last_save > cfg.checkpoint_s:
                save_checkpoint(folder, head, opt, pos, cfg)
                last_save = time.perf_counter()
    head.eval()
    save_checkpoint(folder, head, opt, pos, cfg)
    return pos


def record(cfg, prepared: Prepared, pos: Position, evaluation: dict[str, Any]) -> dict[str, Any]:
    """How a head was trained and evaluated, as its config keeps it."""
    return {
        "data": cfg.data,
        "sequences": len(prepared.train_ids),
        "feature_tokens": prepared.store.tokens,
        "feature_seconds": round(prepared.feature_s, 1),
        "trained_tokens": pos.trained_tokens,
        "train_seconds": round(pos.seconds, 1),
        "epochs": round(pos.epoch + pos.index / max(1, len(prepared.train_ids)), 2),
        "config": asdict(cfg),
        "evaluation": evaluation,
        "machine_threads": torch.get_num_threads(),
    }
