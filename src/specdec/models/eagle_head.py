"""An EAGLE draft head (Li et al. 2024): one decoder layer that autoregresses on the
target's own features, and its files.

At slot ``s`` of the head's sequence the input is ``fc([embed(t_s), f_{s-1}])``: the
embedding of token ``s`` beside the feature after token ``s - 1`` (the target's last
hidden state, through the target's final norm; for a drafted token, the head's own
prediction of it; zeros before the first token). The layer's output predicts the
target's hidden state at ``s``, which the target's final norm and LM head (frozen,
shared, never stored with the head) turn into the logits of token ``s + 1``, over the
head's draft vocabulary (``d2t``: the target token ids it may draft) only.

Deviations from EAGLE-1, said again in docs/BENCHMARKS.md: the layer keeps its input
norm (EAGLE-1 drops it); the head predicts the residual stream before the target's final
norm and that norm is applied to it (EAGLE-1 predicts the normed feature directly: the
same function class, but the target's norm weights come for free); the logits cover a
draft vocabulary of frequent tokens (EAGLE-3's d2t, FR-Spec), not the whole vocabulary.

A head lives in a folder: ``config.json`` (`HeadConfig`) and ``head.safetensors``
(``fc.*``, ``layer.*``, ``d2t``). Loading never unpickles; a head made for another
target, or a damaged file, is refused with one line saying which.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from specdec.errors import SpecdecError
from specdec.models.catalog import cache_dir
from specdec.models.config import ModelConfig
from specdec.models.transformer import Block, RotaryTable, Transformer, _rotate_half

HEAD_FORMAT = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "head.safetensors"


class HeadError(SpecdecError):
    """A head that cannot be used: missing, damaged, or made for another model."""


def heads_dir() -> Path:
    return cache_dir() / "heads"


def head_folder(model: str, kind: str = "eagle") -> Path:
    """Where ``specdec train`` stores the head of ``kind`` for the model named ``model``."""
    return heads_dir() / model.replace("/", "--") / kind


def target_facts(model: Transformer) -> dict[str, int]:
    """What a head must agree with in its target."""
    c = model.config
    return {"hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "num_layers": c.num_layers}


@dataclass
class HeadConfig:
    layer: ModelConfig  # the decoder layer's shape (num_layers 1, the target's vocabulary)
    target: dict[str, Any]  # the target's name and `target_facts`
    draft_vocab: int  # tokens the head drafts among (the target's vocabulary, or fewer)
    version: int = 1  # EAGLE-1
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained, evaluated

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "kind": "eagle",
            "version": self.version,
            "layer": self.layer.to_dict(),
            "target": self.target,
            "draft_vocab": self.draft_vocab,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> HeadConfig:
        try:
            if data.get("format") != HEAD_FORMAT or data.get("kind") != "eagle":
                raise ValueError(f"format {data.get('format')!r}, kind {data.get('kind')!r}")
            return cls(
                layer=ModelConfig.from_dict(data["layer"]),
                target=dict(data["target"]),
                draft_vocab=int(data["draft_vocab"]),
                version=int(data["version"]),
                training=dict(data.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HeadError(f"{where}: not an EAGLE head config ({e})") from None


class EagleHead(nn.Module):
    """The head's own weights: ``fc`` (2·hidden → hidden), one decoder ``layer``, ``d2t``."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        d = config.layer.hidden_size
        self.config = config
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.layer = Block(config.layer)
        for p in self.layer.parameters():
            p.requires_grad_(True)
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
    ) -> EagleHead:
        """A new head for ``target`` (called ``name``), randomly initialised (std 0.02, as
        the papers' layers), drafting among ``draft_tokens`` (target ids; None: all)."""
        c = target.config
        layer = replace(c, num_layers=1, tie_word_embeddings=False)
        vocab = (
            torch.arange(c.vocab_size)
            if draft_tokens is None
            else torch.unique(draft_tokens.to(torch.long))
        )
        if vocab.numel() == 0 or int(vocab[0]) < 0 or int(vocab[-1]) >= c.vocab_size:
            raise HeadError(f"draft tokens must be ids below {c.vocab_size}")
        config = HeadConfig(layer, {"name": name, **target_facts(target)}, int(vocab.numel()))
        head = cls(config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in head.named_parameters():
                if pname.endswith("norm.weight"):
                    p.fill_(1.0)
                elif pname.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            head.d2t.copy_(vocab)
        return head.to(torch.float32)

    def check_target(self, target: Transformer, where: str = "the head") -> None:
        """Refuse a head made for a target of another shape."""
        want, have = self.config.target, target_facts(target)
        for key, value in have.items():
            if int(want.get(key, -1)) != value:
                raise HeadError(
                    f"{where} was trained for {want.get('name', 'another model')} "
                    f"({key} {want.get(key)}), not this model ({key} {value})"
                )

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        """Write the head to ``folder`` whole or not at all (a temporary folder, renamed)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".head-", dir=folder.parent))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=1))
            if folder.exists():
                old = folder.with_name(folder.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EagleHead:
        folder = Path(folder)
        cfg_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not cfg_file.is_file() or not weights.is_file():
            raise HeadError(f"{folder}: no EAGLE head here ({CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            data = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise HeadError(f"{cfg_file}: unreadable ({e})") from None
        head = cls(HeadConfig.from_json(data, str(cfg_file)))
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise HeadError(f"{weights}: damaged ({e})") from None
        expected = head.state_dict()
        if set(tensors) != set(expected) or any(
            tensors[k].shape != expected[k].shape for k in expected
        ):
            raise HeadError(f"{weights}: its tensors do not match its config")
        head.load_state_dict(tensors)
        d2t = head.d2t
        vocab = int(head.config.target.get("vocab_size", 0))
        if d2t.numel() > 1 and not bool((d2t[1:] > d2t[:-1]).all()) or int(d2t.max()) >= vocab:
            raise HeadError(f"{weights}: its draft vocabulary is not increasing ids below {vocab}")
        return head.to(torch.float32)

    # ------------------------------------------------------------------ training
    def sequence_forward(
        self, target: Transformer, tokens: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over a whole sequence at once, causally, with autograd (training).
        ``features`` (T, hidden): the normed feature before each token (row 0 zeros).
        Returns the predicted hidden states (T, hidden) and their logits over the draft
        vocabulary (T, draft_vocab): what the runtime computes token by token."""
        ((h, logits),) = self.unrolled_forward(target, tokens, features, 1)
        return h, logits

    def unrolled_forward(
        self,
        target: Transformer,
        tokens: torch.Tensor,
        features: torch.Tensor,
        steps: int,
        head_weight: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training-time test (EAGLE-3): step 1 is `sequence_forward`; at step k row s is
        what the head computes for a token drafted at depth k - 1 after the committed
        prefix ending at s - k + 1: its input feature is step k - 1's output at s - 1, and
        it attends to step 1's keys up to s - k + 1 and to step j's key at s - k + j (j = 2
        .. k), exactly its context when drafting. Rows s < k - 1 have no such prefix (their
        outputs are to be ignored). ``head_weight``: the target's LM head rows at ``d2t``
        (computed once by the caller; `head_rows`). Returns (hidden, logits) per step."""
        cfg = self.config.layer
        n = tokens.shape[0]
        w = head_weight if head_weight is not None else head_rows(target, self.d2t)
        embeds = target.embed(tokens).to(features.dtype)
        cos, sin = RotaryTable(cfg, features.device).lookup(
            torch.arange(n, device=features.device), features.dtype
        )
        attn, norm = self.layer.attn, target.norm
        rows = torch.arange(n).unsqueeze(1)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        out = []
        for k in range(1, steps + 1):
            if k > 1:
                prev = norm(out[-1][0])
                features = torch.cat([prev.new_zeros(1, prev.shape[1]), prev[:-1]])
            x = self.fc(torch.cat([embeds, features], dim=-1))
            qkv = attn.wqkv(self.layer.attn_norm(x))
            heads = qkv.view(n, attn.n_heads + 2 * attn.n_kv, attn.head_dim).transpose(0, 1)
            qk, v = heads.split([attn.n_heads + attn.n_kv, attn.n_kv])
            qk = qk * cos + _rotate_half(qk) * sin
            q, key = qk.split([attn.n_heads, attn.n_kv])
            keys.append(key)
            values.append(v)
            cols = torch.arange(n).unsqueeze(0)
            masks = [cols <= rows - (k - 1)]  # step 1's keys: the committed prefix
            masks += [cols == rows - (k - j) for j in range(2, k + 1)]  # one per later step
            mask = torch.cat(masks, dim=1)
            o = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                torch.cat(keys, dim=1).unsqueeze(0),
                torch.cat(values, dim=1).unsqueeze(0),
                attn_mask=mask if k > 1 else None,
                is_causal=k == 1,
                enable_gqa=True,
            )[0]
            h = x + attn.wo(o.transpose(0, 1).reshape(n, attn.n_heads * attn.head_dim))
            h = h + self.layer.ffn(self.layer.ffn_norm(h))
            out.append((h, F.linear(norm(h), w.to(h.dtype))))
        return out


def head_rows(target: Transformer, rows: torch.Tensor) -> torch.Tensor:
    """The float weights of the target's LM head at ``rows`` (vocab ids): a plain linear's
    own; a packed or quantised head's as its kernel computes them (the identity through it:
    a one-hot row quantises exactly), for gradients through the frozen head."""
    head = target.lm_head
    if isinstance(head, nn.Linear):
        return head.weight[rows].detach().float().clone()
    part = head.rows(rows) if hasattr(head, "rows") else head
    with torch.inference_mode():
        d = target.config.hidden_size
        eye = torch.eye(d, dtype=target.dtype)
        w = (part(eye) - part(torch.zeros(1, d, dtype=target.dtype))).float().T
        if part is head:
            w = w[rows]
    return w.contiguous().clone()
