"""Training an EAGLE head on this machine: ``specdec train eagle``.

Stages, each resumable (a run cut short continues where its files say):
1. features: sequences from the corpus (`specdec.train.corpus`); for prompts, the
   target's own greedy answer is generated first (self-distillation); then the target's
   hidden states at every position, from one prefill per sequence, go to a
   `FeatureStore` on disk.
2. draft vocabulary: the ``draft_vocab`` most frequent tokens of the store and the end
   tokens (EAGLE-3's d2t), fixed for the run.
3. epochs: per sequence, the head's unrolled passes (`EagleHead.unrolled_forward`: step 1
   on the target's features, steps 2.. on its own, as when drafting; EAGLE-3's
   training-time test) against the target's own next-token distribution (cross-entropy
   over the draft vocabulary) and, for version 1 at step 1, the target's feature (smooth
   L1, EAGLE-1's regression loss, here on unit-RMS rows; version 3 has none, as EAGLE-3);
   AdamW. A checkpoint (weights, optimiser,
   position) is written each ``checkpoint_s`` and at the end; a resumed run equals an
   uninterrupted one.
4. evaluation on held-out sequences: top-1 agreement with the target per drafting depth,
   and the chain acceptance it implies; then the head is written to its folder, and τ
   through the engine is measured on a few chat questions (``engine_prompts``).

Deviations from the papers: the head trains on far less data (a CPU hour of features,
not ShareGPT's 68k dialogues); version 1's loss weights are EAGLE-1's (regression 1,
classification 0.1) with EAGLE-3's unrolled steps added; its feature noise (EAGLE-1's) is
Gaussian, scaled by each feature row's RMS; version 3 trains without noise, on the
classification alone, as EAGLE-3.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from specdec.engine import Generation
from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import EagleHead, default_feature_layers, head_folder, head_rows
from specdec.speculation.drafters.base import layer_features
from specdec.train.corpus import items
from specdec.train.features import FeatureStore


@dataclass(frozen=True)
class TrainConfig:
    data: str = "prompts,python"
    version: int = 1  # EAGLE-1 or EAGLE-3
    minutes: float | None = 60.0  # training time (the epochs), across resumed runs
    tokens: int | None = None  # or: training tokens (sequence tokens x steps run)
    feature_tokens: int = 150_000  # tokens of features to compute (the store's size)
    seq_len: int = 512
    respond: int = 128  # tokens of the target's own answer after each prompt (0: none)
    draft_vocab: int = 32768
    unroll: int = 2
    lr: float = 3e-4
    noise: float = 0.05
    reg_weight: float = 1.0
    cls_weight: float = 0.1
    held_out: float = 0.05  # share of the store's sequences kept for evaluation
    checkpoint_s: float = 60.0
    engine_prompts: int = 2  # held-out prompts generated through the engine at the end
    engine_tokens: int = 96
    seed: int = 0

    def check(self) -> None:
        if self.minutes is not None and self.minutes <= 0:
            raise InvalidRequestError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.tokens is not None and self.tokens <= 0:
            raise InvalidRequestError(f"--tokens must be > 0, got {self.tokens}")
        if self.feature_tokens < 1 or self.seq_len < 16:
            raise InvalidRequestError("--feature-tokens must be >= 1 and --seq-len >= 16")
        if not 0 <= self.respond < self.seq_len // 2:
            raise InvalidRequestError(
                f"--respond must be in [0, {self.seq_len // 2}) for --seq-len {self.seq_len}"
            )
        if self.version not in (1, 3):
            raise InvalidRequestError(f"--version must be 1 or 3, got {self.version}")
        if self.draft_vocab < 1 or self.unroll < 1 or self.lr <= 0:
            raise InvalidRequestError("--draft-vocab, --unroll and --lr must be positive")


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
        self.what, self.total, self.unit, self.enabled, self.every = (
            what,
            total,
            unit,
            enabled,
            every,
        )
        self.kind = kind
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


# ---------------------------------------------------------------------------- features
def stored_layers(version: int, num_layers: int) -> tuple[int, ...]:
    """The target layers a store keeps per token: what the head reads, and the last
    layer's output (the target's distribution, the training target)."""
    return tuple(sorted({*default_feature_layers(version, num_layers), num_layers}))


def compute_features(
    gen,
    store: FeatureStore,
    cfg: TrainConfig,
    progress: bool,
    donors: tuple = (),
    kind: str = "eagle",
) -> None:
    """Fill ``store`` up to ``cfg.feature_tokens`` (what it holds already is kept). The
    target's answers are taken from ``donors`` (stores of the same model, data and
    lengths, made for another head version) where they hold them: answering is most of
    the cost, and the same greedy answer would come out."""
    layers = stored_layers(cfg.version, gen.target.model.config.num_layers)
    tok = gen.tokenizer

    def chat(text: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": text}])

    meter = Meter("features", cfg.feature_tokens, "tokens", progress, kind=kind)
    done = len(store)
    for n, item in enumerate(items(cfg.data, tok.encode, chat, cfg.seq_len, cfg.respond)):
        if store.tokens >= cfg.feature_tokens:
            break
        if n < done:
            continue  # made by an earlier run
        tokens = list(item.tokens)
        answered = next(
            (
                d.sequence(n)[0].tolist()
                for d in donors
                if item.respond and n < len(d) and d.sources[n] == item.source
            ),
            None,
        )
        if answered and answered[: len(tokens)] == tokens:
            tokens = answered
        elif item.respond:  # the target's own answer (prompt lookup: the same, sooner)
            answer = Generation()
            stream = gen.engine.stream(
                tokens, max_new_tokens=cfg.respond, drafter=gen.drafter("pld"), result=answer
            )
            for _ in stream:
                pass
            tokens += answer.token_ids
        tokens = tokens[: cfg.seq_len]
        gen.target.reset()
        _, hidden = gen.target.forward(
            tokens, logits_rows=slice(-1, None), return_hidden=True, hidden_layers=layers
        )
        gen.target.reset()
        store.append(tokens, hidden, item.source)
        meter.update(store.tokens, f", {len(store)} sequences")
    meter.update(store.tokens, f", {len(store)} sequences", force=True)
    if len(store) < 2:
        raise InvalidRequestError(f"--data {cfg.data!r} gave fewer than 2 sequences")


def open_store(gen, cfg: TrainConfig, work: Path, heads: Path) -> tuple[FeatureStore, str]:
    """The feature store for ``cfg``'s data and layers, and its key: one of the same
    identity already under ``heads`` (the model's heads folder: another kind of head
    made from the same data reads the same features), else a new one in ``work``."""
    model = gen.target.model
    layers = stored_layers(cfg.version, model.config.num_layers)
    identity = f"{gen.identity}|{cfg.seq_len}|{cfg.respond}|{cfg.data}"
    if layers != (model.config.num_layers,):
        identity += f"|layers {','.join(map(str, layers))}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    folder = work / f"features-{key}"
    if not (folder / "index.json").exists():
        folder = next((f for f in sorted(heads.glob(f"*-work/features-{key}"))), folder)
    return FeatureStore(folder, model.config.hidden_size * len(layers), identity), key


def answer_donors(heads: Path, identity: str, store: FeatureStore) -> tuple[FeatureStore, ...]:
    """Other stores under ``heads`` (the model's heads folder) made from the same data with
    the same lengths: their sequences hold the target's answers."""
    base = identity.split("|layers ")[0]
    found = []
    for index in sorted(heads.glob("*-work/features-*/index.json")):
        if index.parent == store.folder:
            continue
        try:
            data = json.loads(index.read_text())
            other = data["identity"]
            if other.split("|layers ")[0] == base:
                found.append(FeatureStore(index.parent, int(data["hidden_size"]), other))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return tuple(found)


# ---------------------------------------------------------------------------- training
def draft_tokens(store: FeatureStore, vocab: int, n: int, ends: frozenset[int]) -> torch.Tensor:
    """The ``n`` most frequent tokens of the store, and the end tokens (ids increasing)."""
    counts = store.token_counts(vocab).double()
    counts += torch.arange(vocab, 0, -1, dtype=torch.float64) * 1e-9  # ties: lower ids first
    top = torch.topk(counts, min(n, vocab)).indices
    extra = torch.tensor(sorted(e for e in ends if 0 <= e < vocab), dtype=torch.long)
    return torch.unique(torch.cat([top, extra]))


def sequence_loss(
    head: EagleHead,
    target,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The loss on one sequence, and per step (right, counted) top-1 agreements.
    ``hidden``: the store's rows (`stored_layers` side by side); ``weight``: the target's
    LM-head rows at the draft vocabulary."""
    n_layers = target.config.num_layers
    have = stored_layers(head.version, n_layers)
    last = layer_features(hidden, have, (n_layers,))
    with torch.no_grad():
        normed = target.norm(last)
        want = F.linear(normed, weight).log_softmax(-1)  # the target's distribution
        best = want.argmax(-1)
    if head.version == 1:
        feats = normed  # version 1's committed features: the target's normed last layer
        if cfg.noise > 0 and generator is not None:
            scale = feats.pow(2).mean(-1, keepdim=True).sqrt() * cfg.noise
            feats = feats + torch.randn(feats.shape, generator=generator) * scale
    else:
        feats = head.committed_features(
            target, layer_features(hidden, have, head.config.feature_layers)
        )
    inputs = torch.cat([feats.new_zeros(1, feats.shape[1]), feats[:-1]])
    steps = head.unrolled_forward(target, tokens, inputs, cfg.unroll, weight)
    if head.version == 1:
        # the feature regression on unit-RMS rows: the target's norm weights (about 5 at the
        # 1.5B) would otherwise scale this term, and its balance with the classification
        loss = cfg.reg_weight * F.smooth_l1_loss(_unit(steps[0][0]), _unit(last))
        cls_weight = cfg.cls_weight
    else:
        loss, cls_weight = torch.zeros(()), 1.0
    agree = []
    for k, (_, logits) in enumerate(steps, start=1):
        rows = slice(k - 1, None)  # rows with a committed prefix at this depth
        logp = logits[rows].log_softmax(-1)
        ce = -(want[rows].exp() * logp).sum(-1).mean()
        loss = loss + cls_weight * ce
        agree.append((int((logits[rows].argmax(-1) == best[rows]).sum()), logp.shape[0]))
    return loss, agree


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@dataclass
class Position:
    epoch: int = 0
    index: int = 0  # sequences of this epoch done
    steps: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0


def epoch_order(n_train: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_train, generator=g).tolist()


def save_checkpoint(folder: Path, head, opt, pos: Position, cfg) -> None:
    """``head`` (an EAGLE head or Medusa heads: their ``save``), the optimiser's state and
    the position, written whole or not at all."""
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


def train(
    gen,
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    work: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a head for ``gen``'s target (a loaded `specdec.api.Generator`, native backend)
    and write it to ``out`` (default: the model's head folder). ``work`` keeps features
    and checkpoints (default: beside ``out``). Returns the head's evaluation."""
    cfg.check()
    from specdec.models.target import NativeTarget

    if not isinstance(gen.target, NativeTarget):
        raise InvalidRequestError("training a head needs the native backend (--backend native)")
    model = gen.target.model
    out = Path(out) if out else head_folder(gen.name, "eagle3" if cfg.version == 3 else "eagle")
    work = Path(work) if work else out.with_name(out.name + "-work")
    if not resume and work.exists():
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
    store, key = open_store(gen, cfg, work, out.parent)
    t0 = time.perf_counter()
    compute_features(gen, store, cfg, progress, answer_donors(out.parent, store.identity, store))
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
    head = EagleHead.for_target(model, gen.name, d2t, seed=cfg.seed, version=cfg.version)
    weight = head_rows(model, head.d2t).float()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    pos = (load_checkpoint(work / "checkpoint", head, opt) if resume else None) or Position()

    budget_tokens = cfg.tokens or math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None and cfg.tokens is None else math.inf
    meter = Meter(
        "epochs",
        budget_tokens if budget_tokens < math.inf else budget_s,
        "tokens" if budget_tokens < math.inf else "s",
        progress,
    )
    last_save = time.perf_counter()
    run_start = time.perf_counter() - pos.seconds
    recent: list[float] = []
    with torch.enable_grad():
        while pos.trained_tokens < budget_tokens and pos.seconds < budget_s:
            order = epoch_order(len(train_ids), cfg.seed, pos.epoch)
            if pos.index >= len(order):
                pos.epoch, pos.index = pos.epoch + 1, 0
                continue
            i = train_ids[order[pos.index]]
            tokens, hidden = store.sequence(i)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + pos.epoch * 1_000_003 + i)
            loss, _ = sequence_loss(head, model, weight, tokens, hidden, cfg, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
            opt.step()
            pos.index += 1
            pos.steps += 1
            pos.trained_tokens += len(tokens) * cfg.unroll
            pos.seconds = time.perf_counter() - run_start
            recent = (recent + [float(loss.detach())])[-50:]
            done = pos.trained_tokens if budget_tokens < math.inf else pos.seconds
            meter.update(
                done,
                f", {pos.trained_tokens:,} tokens ({pos.trained_tokens / pos.seconds:.0f}/s), "
                f"epoch {pos.epoch + 1}, loss {sum(recent) / len(recent):.3f}",
            )
            if time.perf_counter() - last_save > cfg.checkpoint_s:
                save_checkpoint(work / "checkpoint", head, opt, pos, cfg)
                last_save = time.perf_counter()
    save_checkpoint(work / "checkpoint", head, opt, pos, cfg)

    evaluation = evaluate(head, model, weight, store, eval_ids, cfg)
    head.config.training = {
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
    head.save(out)
    if cfg.engine_prompts > 0:
        head.config.training["engine"] = engine_check(gen, out, cfg)
        head.save(out)
    return head.config.training


def engine_check(gen, folder: Path, cfg: TrainConfig) -> dict[str, Any]:
    """τ of the new head through the engine (a greedy chain of 4) on the first
    ``engine_prompts`` held-out questions of Spec-Bench's chat category, and whether the
    output is the model's own."""
    from specdec.bench.questions import load_dataset

    questions = load_dataset("spec-bench").select(["mt_bench"], limit=cfg.engine_prompts)
    drafter = gen.drafter("eagle", head=str(folder), tree="none", num_draft_tokens=4)
    passes = tokens = same = 0
    for q in questions.questions:
        ids = gen.prompt_ids(q.turns[0])
        runs = []
        for d in (drafter, None):
            res = Generation()
            for _ in gen.engine.stream(
                ids, max_new_tokens=cfg.engine_tokens, drafter=d, result=res
            ):
                pass
            runs.append(res)
        passes += runs[0].stats.target_passes
        tokens += runs[0].stats.new_tokens
        same += runs[0].token_ids == runs[1].token_ids
    return {
        "prompts": len(questions.questions),
        "tau_chain4": round(tokens / max(1, passes), 3),
        "identical": same,
    }


@torch.no_grad()
def evaluate(head, model, weight, store: FeatureStore, ids: list[int], cfg: TrainConfig):
    """Top-1 agreement with the target per drafting depth on held-out sequences (teacher
    forced: depth k drafts after k - 1 right guesses), the chain acceptance it implies
    (products of the agreements), and the mean loss."""
    right = [0] * cfg.unroll
    counted = [0] * cfg.unroll
    losses = []
    for i in ids:
        tokens, hidden = store.sequence(i)
        loss, agree = sequence_loss(head, model, weight, tokens, hidden, cfg, None)
        losses.append(float(loss))
        for k, (r, c) in enumerate(agree):
            right[k] += r
            counted[k] += c
    acc = [r / c if c else 0.0 for r, c in zip(right, counted, strict=True)]
    chain, expected = 1.0, 1.0
    for a in acc:
        chain *= a
        expected += chain
    return {
        "sequences": len(ids),
        "top1_by_depth": [round(a, 4) for a in acc],
        "tokens_per_step_chain": round(expected, 3),  # 1 + sum of products, depths trained
        "loss": round(sum(losses) / max(1, len(losses)), 4),
    }
