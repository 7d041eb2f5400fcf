"""Training a draft model on this machine: ``specdec train draft``.

White-box distillation of a small model towards its target (DistillSpec, Zhou et al.
2024; FastDraft's recipe for a drafter smaller than any packaged model, Intel 2024):

- the draft (a model of the target's vocabulary, maybe cut to its first ``layers``
  decoder layers: a drafted token must cost little on a CPU) is loaded with float
  weights and trained whole;
- the data are the target's: the EAGLE-1 feature store of the same corpus (the model's
  own answers to the training prompts, and code), whose last hidden states give the
  target's distribution at every position through its final norm and LM head, so no
  target pass runs while training (a store made for the heads is read as it is);
- per stored sequence, the draft runs over every token with autograd; at ``rows``
  positions drawn at random, one of DistillSpec's divergences (`specdec.train.
  divergences`: fkl, rkl, jsd, tvd) between the target's and the draft's next-token
  distributions at ``temperature`` is the loss; AdamW;
- a checkpoint (the draft's folder, the optimiser, the position) each ``checkpoint_s``
  and at the end, a resumed run equal to an uninterrupted one;
- held out, before and after: the mean acceptance Σ min(p, q) at temperature 1 (what
  speculative sampling keeps of a drafted token) and the greedy agreement (the argmaxes
  equal), with the τ each gives a chain of 4 if acceptance were independent per token.

Deviations from DistillSpec: the data are the target's answers (its fixed-data variant
with model-generated data; the paper finds target- and draft-generated data alike, and
prefers the draft's for cost on an accelerator); every position is scored, prompts too
(the paper scores the output only); ``rows`` random positions per sequence bound the
cost of the LM head over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdec.errors import InvalidRequestError
from specdec.models.catalog import drafts_dir
from specdec.models.eagle_head import head_folder
from specdec.models.transformer import head_logits
from specdec.speculation.drafters.base import layer_features
from specdec.train import eagle as shared
from specdec.train.divergences import DIVERGENCES, acceptance, divergence
from specdec.train.draft_model import save_draft, sequence_logits, trainable_copy
from specdec.train.loop import prepare, record, run_epochs

CHAIN = 4  # the chain whose τ the held-out acceptance is turned into


@dataclass(frozen=True)
class DraftTrainConfig:
    draft: str = "qwen2.5-coder-0.5b"
    layers: int | None = None  # decoder layers kept (None: all)
    loss: str = "fkl"
    beta: float = 0.5  # the JSD's
    temperature: float = 1.0
    data: str = "prompts,python"
    minutes: float | None = 30.0
    tokens: int | None = None  # or: training tokens (sequence tokens)
    feature_tokens: int = 150_000
    seq_len: int = 512
    respond: int = 128
    rows: int = 128  # positions scored per training sequence
    lr: float = 1e-4
    held_out: float = 0.05
    checkpoint_s: float = 60.0
    seed: int = 0

    def check(self) -> None:
        if self.minutes is not None and self.minutes <= 0:
            raise InvalidRequestError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.tokens is not None and self.tokens <= 0:
            raise InvalidRequestError(f"--tokens must be > 0, got {self.tokens}")
        if self.loss not in DIVERGENCES:
            raise InvalidRequestError(
                f"unknown --loss {self.loss!r}: one of {', '.join(DIVERGENCES)}"
            )
        if not 0 < self.beta < 1 or self.temperature <= 0:
            raise InvalidRequestError("--beta must be in (0, 1) and --temperature > 0")
        if self.layers is not None and self.layers < 1:
            raise InvalidRequestError(f"--layers must be >= 1, got {self.layers}")
        if self.rows < 1 or self.lr <= 0:
            raise InvalidRequestError("--rows and --lr must be positive")
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


class DraftUnderTraining(nn.Module):
    """The draft being trained, as the epochs' checkpoints save and load it: a folder
    that `specdec.models.loading` reads (`save_draft`)."""

    def __init__(self, model, tokenizer_folder: Path, info: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.tokenizer_folder = Path(tokenizer_folder)
        self.info = info

    def save(self, folder: str | Path) -> Path:
        return save_draft(self.model, self.tokenizer_folder, folder, self.info)

    @classmethod
    def load(cls, folder: str | Path) -> DraftUnderTraining:
        from specdec.models.loading import load_model

        loaded = load_model(folder, dtype="float32", quant="none", progress=False, pack=False)
        return cls(trainable_copy(loaded.model), Path(folder), {})


def default_name(cfg: DraftTrainConfig, target: str) -> str:
    """A trained draft's name: the draft, its layers, its target."""
    cut = f"-{cfg.layers}l" if cfg.layers else ""
    return f"{cfg.draft.replace('/', '--')}{cut}-for-{target.replace('/', '--')}"


def held_out(draft, target, sequences, cfg: DraftTrainConfig) -> dict[str, Any]:
    """Mean acceptance at temperature 1 and greedy agreement over every position of the
    held-out ``sequences`` ((tokens, the target's last-layer states) pairs), and the τ of
    a chain of `CHAIN` each gives."""
    accepted = agreed = seen = 0.0
    loss = 0.0
    with torch.no_grad():
        for tokens, last in sequences:
            want = _target_logits(target, last)
            got = sequence_logits(draft, tokens)
            accepted += float(acceptance(want, got).sum())
            agreed += float(acceptance(want, got, temperature=0).sum())
            loss += float(divergence(want, got, cfg.loss, cfg.beta, cfg.temperature).sum())
            seen += tokens.shape[0]
    a, g = accepted / max(seen, 1), agreed / max(seen, 1)
    return {
        "positions": int(seen),
        "acceptance": round(a, 4),
        "greedy_agreement": round(g, 4),
        f"tau_chain{CHAIN}": round(chain_tau(a), 3),
        f"tau_chain{CHAIN}_greedy": round(chain_tau(g), 3),
        "loss": round(loss / max(seen, 1), 4),
    }


def chain_tau(alpha: float, k: int = CHAIN) -> float:
    """Tokens per target pass of a chain of ``k`` whose tokens are each accepted with
    probability ``alpha``, independently: (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def _target_logits(target, last: torch.Tensor) -> torch.Tensor:
    """The target's next-token logits from its last-layer states (rows, vocab), float32."""
    x = target.norm(last.to(target.dtype))
    return head_logits(target.lm_head, x, None).float()


def train(
    gen,
    cfg: DraftTrainConfig,
    *,
    name: str | None = None,
    out: Path | None = None,
    work: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil ``cfg.draft`` towards ``gen``'s target (a loaded `specdec.api.Generator`,
    native backend) and write it to ``out`` (default: `drafts_dir` / ``name``); returns
    its name and folder, how it was trained and the held-out numbers before and after."""
    from specdec.models.loading import converted_folder, load_model

    cfg.check()
    name = name or default_name(cfg, gen.name)
    out = Path(out) if out else drafts_dir() / name
    target = gen.target.model
    loaded = load_model(cfg.draft, dtype="float32", quant="none", progress=progress, pack=False)
    if loaded.tokenizer.vocab() != gen.tokenizer.vocab():
        raise InvalidRequestError(
            f"draft model {cfg.draft!r} has another vocabulary than {gen.name}: a trained "
            "draft must share the target's tokens"
        )
    tokenizer_folder = loaded.source if loaded.source.is_dir() else converted_folder(loaded.source)
    draft = trainable_copy(loaded.model, cfg.layers)
    del loaded
    # the run's store and checkpoints live beside the target's heads (the store is theirs)
    run = prepare(
        gen,
        cfg.features(),
        kind="draft",
        out=head_folder(gen.name, f"draft-{name}"),
        work=work,
        resume=resume,
        progress=progress,
        draft_vocab=1,
        held_out=cfg.held_out,
    )
    n_layers = target.config.num_layers
    have = shared.stored_layers(1, n_layers)

    def sequence(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, hidden = run.store.sequence(i)
        return tokens, layer_features(hidden, have, (n_layers,))

    eval_sequences = [sequence(i) for i in run.eval_ids]
    before = held_out(draft, target, eval_sequences, cfg)
    info = {
        "target": gen.name,
        "draft": cfg.draft,
        "layers": draft.config.num_layers,
        "loss": cfg.loss,
    }
    module = DraftUnderTraining(draft, tokenizer_folder, info)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step(i: int, epoch: int, done: float) -> tuple[torch.Tensor, int]:
        tokens, last = sequence(i)
        n = tokens.shape[0]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 1_000_003 + i)
        rows = torch.randperm(n, generator=g)[: min(cfg.rows, n)].sort().values
        with torch.no_grad():
            want = _target_logits(target, last[rows])
        got = sequence_logits(module.model, tokens, rows)
        loss = divergence(want, got, cfg.loss, cfg.beta, cfg.temperature).mean()
        return loss, n

    pos = run_epochs(module, opt, step, run, cfg, resume=resume, progress=progress, kind="draft")
    after = held_out(module.model, target, eval_sequences, cfg)
    info["training"] = record(cfg, run, pos, {"before": before, "after": after})
    module.info = info
    module.save(out)
    return {"name": name, "folder": str(out), **info["training"]}


def describe(report: dict[str, Any]) -> str:
    """One line on a finished run: held-out acceptance and τ before and after."""
    ev = report["evaluation"]
    b, a = ev["before"], ev["after"]
    key = f"tau_chain{CHAIN}"
    return (
        f"held-out acceptance {b['acceptance']:.3f} -> {a['acceptance']:.3f}, greedy agreement "
        f"{b['greedy_agreement']:.3f} -> {a['greedy_agreement']:.3f} (tau of a chain of "
        f"{CHAIN}: {b[key]:.2f} -> {a[key]:.2f}, greedy {b[key + '_greedy']:.2f} -> "
        f"{a[key + '_greedy']:.2f})"
    )
