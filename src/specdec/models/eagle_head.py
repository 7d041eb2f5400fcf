"""An EAGLE draft head (Li et al. 2024, 2025): one decoder layer that autoregresses on
the target's own features, and its files.

Version 1 (EAGLE-1, as below) reads the target's last hidden state; version 3 (EAGLE-3,
further below) three layers' states fused, with a norm and LM head of its own.

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

Version 3, as EAGLE-3 and as vLLM runs it (the `speculators` format,
`specdec.models.speculators_format`): the committed feature before token ``s`` is
``fc([h_a, h_b, h_c])``, the target's residual stream entering layers a, b, c (by default
2, L/2 and L - 3 of L) side by side; for a drafted token, the layer's own output at its
parent. The layer's attention reads ``[input_norm(embed(t_s)), hidden_norm(feature)]``
(2·hidden wide), its residual is the feature; its output, through the head's own ``norm``
and ``lm_head`` (over the draft vocabulary only), gives the logits of token ``s + 1``.
No q/k/v bias, whatever the target's (the format has none).

A head lives in a folder: ``config.json`` (`HeadConfig`) and ``head.safetensors``
(``fc.*``, ``layer.*``, ``d2t``; version 3 also ``hidden_norm``, ``norm``, ``lm_head``).
Loading never unpickles; a head made for another target, or a damaged file, is refused
with one line saying which.
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
from specdec.models.transformer import Block, RMSNorm, RotaryTable, Transformer, _rotate_half

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


def default_feature_layers(version: int, num_layers: int) -> tuple[int, ...]:
    """The target layers a head reads (ids as `Transformer.forward`'s ``hidden_layers``):
    EAGLE-1 the last layer's output; EAGLE-3 a low, a middle and a high layer's input
    (the choice of the authors' code, vLLM and speculators)."""
    if version == 1:
        return (num_layers,)
    return tuple(sorted({min(2, num_layers - 1), num_layers // 2, max(0, num_layers - 3)}))


@dataclass
class HeadConfig:
    layer: ModelConfig  # the decoder layer's shape (num_layers 1, the target's vocabulary)
    target: dict[str, Any]  # the target's name and `target_facts`
    draft_vocab: int  # tokens the head drafts among (the target's vocabulary, or fewer)
    version: int = 1  # EAGLE-1 or EAGLE-3
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained, evaluated
    feature_layers: tuple[int, ...] = ()  # the target layers read; () = the version's default
    norm_before_residual: bool = False  # version 3: the residual is the normed feature

    def __post_init__(self) -> None:
        if self.version not in (1, 3):
            raise HeadError(f"EAGLE version must be 1 or 3, got {self.version}")
        if not self.feature_layers:
            n = int(self.target.get("num_layers") or self.layer.num_layers)
            self.feature_layers = default_feature_layers(self.version, n)
        self.feature_layers = tuple(int(i) for i in self.feature_layers)
        if self.version == 1 and len(self.feature_layers) != 1:
            raise HeadError("an EAGLE-1 head reads one layer")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "kind": "eagle",
            "version": self.version,
            "layer": self.layer.to_dict(),
            "target": self.target,
            "draft_vocab": self.draft_vocab,
            "feature_layers": list(self.feature_layers),
            "norm_before_residual": self.norm_before_residual,
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
                feature_layers=tuple(data.get("feature_layers") or ()),
                norm_before_residual=bool(data.get("norm_before_residual", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HeadError(f"{where}: not an EAGLE head config ({e})") from None


class EagleHead(nn.Module):
    """The head's own weights: ``fc`` (version 1: 2·hidden → hidden; 3: the feature
    layers' width → hidden), one decoder ``layer``, ``d2t`` (the draft vocabulary's target
    ids, increasing); version 3 also ``hidden_norm``, ``norm`` and ``lm_head``."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        c = config.layer
        d = c.hidden_size
        self.config = config
        self.version = config.version
        self.layer = Block(c)
        if self.version == 1:
            self.fc = nn.Linear(2 * d, d, bias=True)
        else:
            self.fc = nn.Linear(len(config.feature_layers) * d, d, bias=False)
            attn = self.layer.attn
            attn.wqkv = nn.Linear(2 * d, attn.wqkv.out_features, bias=c.attention_bias)
            self.hidden_norm = RMSNorm(d, c.rms_norm_eps)
            self.norm = RMSNorm(d, c.rms_norm_eps)
            self.lm_head = nn.Linear(d, config.draft_vocab, bias=False)
        for p in self.parameters():
            p.requires_grad_(True)
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    # ------------------------------------------------------------ the head's arithmetic
    # (one place for the runtime's passes and training's unrolled ones)
    def committed_features(self, target: Transformer, hidden: torch.Tensor) -> torch.Tensor:
        """The feature rows of committed tokens from the target's hidden states at
        `feature_layers` (rows, layers · hidden)."""
        if self.version == 1:
            return target.norm(hidden)
        return self.fc(hidden)

    def layer_input(
        self, embeds: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's input and the residual, from token embeddings and features."""
        if self.version == 1:
            x = self.fc(torch.cat([embeds, features], dim=-1))
            return self.layer.attn_norm(x), x
        f = self.hidden_norm(features)
        a = torch.cat([self.layer.attn_norm(embeds), f], dim=-1)
        return a, f if self.config.norm_before_residual else features

    def next_features(self, target: Transformer, h: torch.Tensor) -> torch.Tensor:
        """The feature a drafted child reads: the layer's output ``h`` as a feature."""
        return target.norm(h) if self.version == 1 else h

    def logits(self, target: Transformer, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary; ``weight``: the target's LM-head rows at d2t
        (version 1 only)."""
        if self.version == 1:
            return F.linear(target.norm(h), weight.to(h.dtype))
        return self.lm_head(self.norm(h))

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
        version: int = 1,
        feature_layers: tuple[int, ...] = (),
    ) -> EagleHead:
        """A new head for ``target`` (called ``name``), randomly initialised (std 0.02, as
        the papers' layers), drafting among ``draft_tokens`` (target ids; None: all).
        Version 3's norm and LM head start as the target's (its rows at the draft
        vocabulary): the head begins by reading its output as the target reads its own."""
        c = target.config
        layer = replace(c, num_layers=1, tie_word_embeddings=False)
        if version == 3:
            layer = replace(layer, attention_bias=False)
        vocab = draft_vocab_ids(c.vocab_size, draft_tokens)
        config = HeadConfig(
            layer,
            {"name": name, **target_facts(target)},
            int(vocab.numel()),
            version=version,
            feature_layers=feature_layers,
        )
        for i in config.feature_layers:
            if not 0 <= i <= c.num_layers:
                raise HeadError(f"feature layer {i} is not one of 0..{c.num_layers}")
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
            if version == 3:
                head.norm.weight.copy_(target.norm.weight.float())
                head.lm_head.weight.copy_(head_rows(target, vocab))
        return head.to(torch.float32)

    def check_target(self, target: Transformer, where: str = "the head") -> None:
        """Refuse a head made for a target of another shape."""
        have = check_target_facts(self.config.target, target, where)
        if max(self.config.feature_layers) > have["num_layers"]:
            raise HeadError(
                f"{where} reads layer {max(self.config.feature_layers)} of its target; this "
                f"model has {have['num_layers']}"
            )

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        """Write the head to ``folder`` whole or not at all."""
        return write_head_folder(folder, self.state_dict(), self.config.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> EagleHead:
        data, tensors, weights = read_head_folder(folder, "EAGLE")
        head = cls(HeadConfig.from_json(data, str(Path(folder) / CONFIG_FILE)))
        load_checked(head, tensors, weights)
        return head.to(torch.float32)

    # ------------------------------------------------------------------ training
    def sequence_forward(
        self, target: Transformer, tokens: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over a whole sequence at once, causally, with autograd (training).
        ``features`` (T, hidden): the committed feature before each token (row 0 zeros).
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
        outputs are to be ignored). ``head_weight``: version 1's LM head, the target's rows
        at ``d2t`` (computed once by the caller; `head_rows`). Returns (hidden, logits) per
        step."""
        cfg = self.config.layer
        n = tokens.shape[0]
        w = head_weight
        if w is None and self.version == 1:
            w = head_rows(target, self.d2t)
        embeds = target.embed(tokens).to(features.dtype)
        cos, sin = RotaryTable(cfg, features.device).lookup(
            torch.arange(n, device=features.device), features.dtype
        )
        attn = self.layer.attn
        rows = torch.arange(n).unsqueeze(1)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        out = []
        for k in range(1, steps + 1):
            if k > 1:
                prev = self.next_features(target, out[-1][0])
                features = torch.cat([prev.new_zeros(1, prev.shape[1]), prev[:-1]])
            a, x = self.layer_input(embeds, features)
            qkv = attn.wqkv(a)
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
            out.append((h, self.logits(target, h, w)))
        return out


def draft_vocab_ids(vocab_size: int, draft_tokens: torch.Tensor | None) -> torch.Tensor:
    """A head's draft vocabulary: ``draft_tokens`` (target ids) sorted and unique, or all
    ``vocab_size`` ids for None; refused when empty or outside the target's vocabulary."""
    vocab = (
        torch.arange(vocab_size)
        if draft_tokens is None
        else torch.unique(draft_tokens.to(torch.long))
    )
    if vocab.numel() == 0 or int(vocab[0]) < 0 or int(vocab[-1]) >= vocab_size:
        raise HeadError(f"draft tokens must be ids below {vocab_size}")
    return vocab


def check_target_facts(want: dict[str, Any], target: Transformer, where: str) -> dict[str, int]:
    """Refuse ``target`` unless its `target_facts` are those a head recorded (``want``;
    a fact recorded as None is not checked); returns its facts. ``where``: the head, as a
    message names it ("the Medusa heads were trained for ...")."""
    have = target_facts(target)
    verb = "were" if where.endswith("s") else "was"
    for key, value in have.items():
        if want.get(key, -1) is not None and int(want.get(key, -1)) != value:
            raise HeadError(
                f"{where} {verb} trained for {want.get('name', 'another model')} "
                f"({key} {want.get(key)}), not this model ({key} {value})"
            )
    return have


def write_head_folder(folder: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """A head's folder (``config`` as config.json, ``state`` as head.safetensors), written
    whole or not at all: a temporary folder, renamed over the old one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".head-", dir=folder.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """``new`` (a finished folder beside ``folder``) renamed to ``folder``, the old one
    moved aside first and then deleted: a reader finds the old folder or the new one."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, folder)


def write_new_folder(
    folder: str | Path, tensors: dict[str, torch.Tensor], config: str, weights: str
) -> Path:
    """An export: ``tensors`` as ``weights`` and ``config`` as config.json in ``folder``,
    which must be new or empty (an export never replaces one), written whole or not at
    all."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise HeadError(f"{folder} exists and is not empty: choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / weights), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_head_folder(folder: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config.json's data, head.safetensors' tensors, the weights' path) of a head of
    ``kind`` (for messages); never unpickles; a missing or damaged file: HeadError."""
    folder = Path(folder)
    cfg_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise HeadError(f"{folder}: no {kind} head here ({CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise HeadError(f"{cfg_file}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise HeadError(f"{cfg_file}: not a {kind} head config")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise HeadError(f"{weights}: damaged ({e})") from None
    return data, tensors, weights


def load_checked(head: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """``tensors`` into ``head`` (built from its config), refused unless they are exactly
    its tensors and its draft vocabulary ``d2t`` is increasing ids below its target's
    vocabulary size."""
    expected = head.state_dict()
    if set(tensors) != set(expected) or any(
        tensors[k].shape != expected[k].shape for k in expected
    ):
        raise HeadError(f"{where}: its tensors do not match its config")
    head.load_state_dict(tensors)
    d2t, vocab = head.d2t, int(head.config.target.get("vocab_size", 0))
    if d2t.numel() > 1 and not bool((d2t[1:] > d2t[:-1]).all()) or int(d2t.max()) >= vocab:
        raise HeadError(f"{where}: its draft vocabulary is not increasing ids below {vocab}")


def load_head(folder: str | Path) -> EagleHead:
    """The head in ``folder``: ours (`EagleHead.load`) or a speculators EAGLE-3 checkpoint."""
    from specdec.models.speculators_format import import_head, is_speculators

    if is_speculators(folder):
        return import_head(folder)
    return EagleHead.load(folder)


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
