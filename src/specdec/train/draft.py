"""Training a draft model on this machine: ``specdec train draft``.

White-box distillation of a small model towards its target (DistillSpec, Zhou et al.
2024; FastDraft's recipe for a drafter smaller than any packaged model, Intel 2024):

- the draft (a model of the target's vocabulary, maybe cut to its first ``layers``
  decoder layers: a drafted token must cost little on a CPU) is loaded with float
  weights and trained whole;
- the data (``data_from``) are the target's (`TargetAnswers`: the EAGLE-1 feature store
  of the same corpus, the model's own answers to the training prompts and code, whose
  last hidden states give the target's distribution at every position through its final
  norm and LM head, so no target pass runs while training; a store made for the heads
  is read as it is), or the draft's own (`OnPolicy`: DistillSpec's on-policy data, the
  draft answering each prompt as it is at that step, the target scoring the answer in
  one pass; code teacher-forced);
- per sequence, the draft runs over every token with autograd; at the scored positions
  (the answer's, or ``rows`` drawn at random), one of DistillSpec's divergences
  (`specdec.train.divergences`: fkl, rkl, jsd, tvd) between the target's and the draft's
  next-token distributions at ``temperature`` is the loss; AdamW;
- a checkpoint (the draft's folder, the optimiser, the position) each ``checkpoint_s``
  and at the end, a resumed run equal to an uninterrupted one;
- held out, before and after: the mean acceptance Σ min(p, q) at temperature 1 (what
  speculative sampling keeps of a drafted token) and the greedy agreement (the argmaxes
  equal), with the τ each gives a chain of 4 if acceptance were independent per token.

Deviations from DistillSpec: with the target's data every position is scored, prompts
too (the paper scores the output only), ``rows`` random positions per sequence bounding
the cost of the LM head over the whole vocabulary; on-policy data are the draft's alone
(the paper also mixes sources by a share λ).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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
from specdec.train.loop import check_budget, prepare, record, run_epochs

CHAIN = 4  # the chain whose τ the held-out acceptance is turned into


@dataclass(frozen=True)
class DraftTrainConfig(shared.ReadsAStore):
    draft: str = "qwen2.5-coder-0.5b"
    layers: int | None = None  # decoder layers kept (None: all)
    loss: str = "fkl"
    data_from: str = "target"  # target: its answers (the heads' store); draft: on-policy
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
        check_budget(self)
        if self.data_from not in ("target", "draft"):
            raise InvalidRequestError(
                f"--data-from must be target or draft, got {self.data_from!r}"
            )
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


def check_name(name: str | None) -> None:
    """Refuse a draft name that is not one folder name (``--draft NAME`` must find it)."""
    if name is not None and (not name or "/" in name or "\\" in name or name.startswith(".")):
        raise InvalidRequestError(
            f"--name {name!r}: a draft's name is one folder name (no '/', not starting with '.')"
        )


def default_name(cfg: DraftTrainConfig, target: str) -> str:
    """A trained draft's name: the draft, its layers, its target."""
    cut = f"-{cfg.layers}l" if cfg.layers else ""
    return f"{cfg.draft.replace('/', '--')}{cut}-for-{target.replace('/', '--')}"


def held_out(draft, examples, cfg: DraftTrainConfig) -> dict[str, Any]:
    """Mean acceptance at temperature 1 and greedy agreement over the scored positions of
    the held-out ``examples`` (each a callable of the draft giving (tokens, rows, the
    target's logits there)), and the τ of a chain of `CHAIN` each gives."""
    accepted = agreed = seen = 0.0
    loss = 0.0
    with torch.no_grad():
        for example in examples:
            tokens, rows, want = example(draft)
            got = sequence_logits(draft, tokens, rows)
            accepted += float(acceptance(want, got).sum())
            agreed += float(acceptance(want, got, temperature=0).sum())
            loss += float(divergence(want, got, cfg.loss, cfg.beta, cfg.temperature).sum())
            seen += want.shape[0]
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


class TargetAnswers:
    """Training sequences from the target's EAGLE-1 store of ``cfg``'s data (its answers
    and the code, with its last hidden states): an example is a stored sequence, scored
    at ``rows`` random positions (held out: every position), the target's distribution
    from its states."""

    def __init__(self, gen, cfg: DraftTrainConfig, heads: Path, work, resume, progress) -> None:
        self.target, self.cfg = gen.target.model, cfg
        self.run = prepare(
            gen,
            cfg.features(),
            kind="draft",
            out=heads,
            work=work,
            resume=resume,
            progress=progress,
            draft_vocab=1,
            held_out=cfg.held_out,
        )
        n = self.target.config.num_layers
        self.layers, self.have = n, shared.stored_layers(1, n)

    def example(self, i: int, g: torch.Generator | None, draft=None):
        tokens, hidden = self.run.store.sequence(i)
        last = layer_features(hidden, self.have, (self.layers,))
        n = tokens.shape[0]
        rows = torch.arange(n)
        if g is not None:
            rows = torch.randperm(n, generator=g)[: min(self.cfg.rows, n)].sort().values
        x = self.target.norm(last[rows].to(self.target.dtype))
        return tokens, rows, head_logits(self.target.lm_head, x, None).float()


class OnPolicy:
    """DistillSpec's on-policy data: each prompt of ``cfg``'s data is answered by the draft
    as it is now (``respond`` tokens sampled at the temperature, up to an end token), and
    the target scores the answer: an example is scored at the answer's positions. Text
    (code) is teacher-forced, scored at ``rows`` random positions. Held out, the answer is
    drawn with a seed of its own, the same before and after training."""

    def __init__(self, gen, cfg: DraftTrainConfig, heads: Path, work, resume) -> None:
        from specdec.train.corpus import tokenizer_items
        from specdec.train.loop import Prepared, held_out_split, run_folder

        self.target, self.cfg = gen.target.model, cfg
        self.ends = gen.tokenizer.eos_token_ids
        self.items, total = [], 0
        for item in tokenizer_items(cfg.data, gen.tokenizer, cfg.seq_len, cfg.respond):
            if total >= cfg.feature_tokens:
                break
            self.items.append(item)
            total += len(item.tokens) + (cfg.respond if item.respond else 0)
        if len(self.items) < 2:
            raise InvalidRequestError("--data gives fewer than two training sequences")
        work = run_folder(heads, work, resume)
        train_ids, eval_ids = held_out_split(len(self.items), cfg.held_out)
        self.run = Prepared(_Tokens(total), work, train_ids, eval_ids, torch.zeros(1), 0.0)

    @torch.inference_mode()
    def answer(self, draft, prompt: list[int], g: torch.Generator) -> list[int]:
        """The draft's sampled answer to ``prompt``."""
        cache = draft.new_cache(capacity=len(prompt) + self.cfg.respond)
        logits = draft(torch.tensor(prompt), torch.arange(len(prompt)), cache,
                       logits_rows=slice(-1, None))  # fmt: skip
        out: list[int] = []
        for _ in range(self.cfg.respond):
            p = (logits[-1].float() / self.cfg.temperature).softmax(-1)
            t = int(torch.multinomial(p, 1, generator=g))
            out.append(t)
            if t in self.ends:
                break
            pos = torch.tensor([len(prompt) + len(out) - 1])
            logits = draft(torch.tensor([t]), pos, cache)
        return out

    def example(self, i: int, g: torch.Generator | None, draft):
        item = self.items[i]
        if g is None:  # held out: a seed per sequence, the same before and after
            g = torch.Generator().manual_seed(self.cfg.seed * 104_729 + i)
            whole = True
        else:
            whole = False
        seq = list(item.tokens)
        if item.respond:
            seq += self.answer(draft, seq, g)
            rows = torch.arange(len(item.tokens) - 1, len(seq) - 1)
        elif whole:
            rows = torch.arange(len(seq))
        else:
            rows = (
                torch.randperm(len(seq), generator=g)[: min(self.cfg.rows, len(seq))].sort().values
            )
        with torch.inference_mode():
            cache = self.target.new_cache(capacity=len(seq))
            want = self.target(torch.tensor(seq), torch.arange(len(seq)), cache, logits_rows=rows)
        return torch.tensor(seq), rows, want.float().clone()


@dataclass
class _Tokens:
    """What a run's record reads of its data: how many tokens."""

    tokens: int


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
    check_name(name)
    name = name or default_name(cfg, gen.name)
    out = Path(out) if out else drafts_dir() / name
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
    if cfg.data_from == "draft":
        data = OnPolicy(gen, cfg, head_folder(gen.name, f"draft-{name}"), work, resume)
    else:
        data = TargetAnswers(gen, cfg, head_folder(gen.name, f"draft-{name}"), work, resume,
                             progress)  # fmt: skip
    run = data.run
    examples = [partial(data.example, i, None) for i in run.eval_ids]
    before = held_out(draft, examples, cfg)
    info = {
        "target": gen.name,
        "draft": cfg.draft,
        "layers": draft.config.num_layers,
        "loss": cfg.loss,
        "data_from": cfg.data_from,
    }
    module = DraftUnderTraining(draft, tokenizer_folder, info)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step(i: int, epoch: int, done: float) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 1_000_003 + i)
        with torch.no_grad():
            tokens, rows, want = data.example(i, g, module.model)
        got = sequence_logits(module.model, tokens, rows)
        loss = divergence(want, got, cfg.loss, cfg.beta, cfg.temperature).mean()
        return loss, tokens.shape[0]

    pos = run_epochs(module, opt, step, run, cfg, resume=resume, progress=progress, kind="draft")
    after = held_out(module.model, examples, cfg)
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
