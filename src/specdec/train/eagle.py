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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specdec.engine import Generation
from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import EagleHead, default_feature_layers, head_folder, head_rows
from specdec.speculation.drafters.base import layer_features
from specdec.train.corpus import tokenizer_items
from specdec.train.features import FeatureStore
from specdec.train.loop import Meter, check_budget, prepare, record, run_epochs


class ReadsAStore:
    """A config trained on the EAGLE-1 store of its ``data`` (``feature_tokens``,
    ``seq_len``, ``respond``): the heads' and draft models' trainers read one store."""

    def features(self) -> TrainConfig:
        """The feature stage's settings, as an EAGLE-1 run of the same data has them."""
        return TrainConfig(
            data=self.data,
            version=1,
            feature_tokens=self.feature_tokens,
            seq_len=self.seq_len,
            respond=self.respond,
        )


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
        check_budget(self)
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

    meter = Meter("features", cfg.feature_tokens, "tokens", progress, kind=kind)
    done = len(store)
    for n, item in enumerate(tokenizer_items(cfg.data, tok, cfg.seq_len, cfg.respond)):
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
    out = Path(out) if out else head_folder(gen.name, "eagle3" if cfg.version == 3 else "eagle")
    run = prepare(
        gen,
        cfg,
        kind="eagle",
        out=out,
        work=work,
        resume=resume,
        progress=progress,
        draft_vocab=cfg.draft_vocab,
        held_out=cfg.held_out,
    )
    model = gen.target.model
    head = EagleHead.for_target(model, gen.name, run.d2t, seed=cfg.seed, version=cfg.version)
    weight = head_rows(model, head.d2t).float()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step(i: int, epoch: int, done: float) -> tuple[torch.Tensor, int]:
        tokens, hidden = run.store.sequence(i)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 1_000_003 + i)
        loss, _ = sequence_loss(head, model, weight, tokens, hidden, cfg, g)
        return loss, len(tokens) * cfg.unroll

    pos = run_epochs(
        head, opt, step, run, cfg, resume=resume, progress=progress, kind="eagle", clip=0.5
    )
    evaluation = evaluate(head, model, weight, run.store, run.eval_ids, cfg)
    head.config.training = record(cfg, run, pos, evaluation)
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
