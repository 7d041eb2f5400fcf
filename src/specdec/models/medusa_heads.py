"""Medusa heads (Cai et al. 2024, Medusa-1): K small heads on the target's last hidden
state, head k guessing the token k + 1 places ahead, all from the same state.

Head k is ``num_layers`` residual blocks, ``x + SiLU(W x + b)`` (W starts at zero: the
block starts as the identity, as the authors initialise it), over the target's last
hidden state after its final norm; its output goes through the target's own LM head at
the draft vocabulary's rows (``d2t``) to give the logits of the token k + 1 places after
the one the state predicts. The heads read nothing drafted: every guess of a step comes
from one committed state, so drafting costs K small matrix products and one LM-head
pass over K rows, never a pass per drafted token.

Deviation from Medusa-1, said again in docs/BENCHMARKS.md: the heads share the target's
frozen LM head (restricted to a draft vocabulary of frequent tokens) instead of each
training an LM head of its own (151,936 × 1,536 weights per head for the 1.5B: more than
a CPU can train from the data it can make). The authors' code initialises its heads' LM
heads from the target's, so the heads here are theirs at initialisation, with only the
residual blocks trained.

A head set lives in a folder as the EAGLE heads do (`specdec.models.eagle_head`):
``config.json`` (`MedusaConfig`, kind "medusa", with the held-out top-k accuracy of
each head that the static tree is chosen from) and ``head.safetensors``
(``blocks.{k}.{j}.weight/bias``, ``d2t``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models.config import ModelConfig
from specdec.models.eagle_head import (
    CONFIG_FILE,
    HEAD_FORMAT,
    HeadError,
    check_target_facts,
    draft_vocab_ids,
    load_checked,
    read_head_folder,
    target_facts,
    write_head_folder,
)
from specdec.models.transformer import Transformer


@dataclass
class MedusaConfig:
    """A Medusa head set's config.json (and the base of other head sets' configs: a
    subclass names its kind and adds its fields through `extra_json`/`extra_fields`)."""

    kind: ClassVar[str] = "medusa"
    label: ClassVar[str] = "Medusa"
    target: dict[str, Any]  # the target's name and `target_facts`
    num_heads: int  # K: head k guesses the token k + 1 places ahead
    num_layers: int  # residual blocks per head
    draft_vocab: int
    # accuracy[k][i]: how often head k's (i+1)-th likeliest token was the target's, held out
    accuracy: list[list[float]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1 or self.draft_vocab < 1:
            raise HeadError(
                f"a {self.label} head set needs num_heads, num_layers, draft_vocab >= 1"
            )

    @classmethod
    def for_target(cls, target: Transformer, name: str, num_heads: int, num_layers: int,
                   vocab: torch.Tensor, **extra: Any):  # fmt: skip
        """The config of new heads for ``target`` (called ``name``) drafting among
        ``vocab`` (target ids, `draft_vocab_ids`); ``extra``: a subclass's fields."""
        return cls(
            target={"name": name, **target_facts(target)},
            num_heads=num_heads,
            num_layers=num_layers,
            draft_vocab=int(vocab.numel()),
            **extra,
        )

    def extra_json(self) -> dict[str, Any]:
        """A subclass's own fields, as written."""
        return {}

    @classmethod
    def extra_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A subclass's own fields, read back (KeyError, TypeError, ValueError if bad)."""
        return {}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "kind": self.kind,
            **self.extra_json(),
            "target": self.target,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "draft_vocab": self.draft_vocab,
            "accuracy": self.accuracy,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str):
        try:
            if data.get("format") != HEAD_FORMAT or data.get("kind") != cls.kind:
                raise ValueError(f"format {data.get('format')!r}, kind {data.get('kind')!r}")
            accuracy = [[float(a) for a in row] for row in data.get("accuracy") or []]
            if any(not 0 <= a <= 1 for row in accuracy for a in row):
                raise ValueError("accuracies outside [0, 1]")
            return cls(
                **cls.extra_fields(data),
                target=dict(data["target"]),
                num_heads=int(data["num_heads"]),
                num_layers=int(data["num_layers"]),
                draft_vocab=int(data["draft_vocab"]),
                accuracy=accuracy,
                training=dict(data.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HeadError(f"{where}: not a {cls.label} head config ({e})") from None


@dataclass(kw_only=True)
class LayerHeadsConfig(MedusaConfig):
    """Medusa's fields and the shape of a decoder layer the heads run (the target's, one
    layer): the base of the sequential head sets' configs, which name only their kind."""

    layer: ModelConfig

    @classmethod
    def for_target(cls, target: Transformer, name: str, num_heads: int, num_layers: int,
                   vocab: torch.Tensor, **extra: Any):  # fmt: skip
        """Medusa's, with the layer of the target's shape (one layer, untied)."""
        layer = replace(target.config, num_layers=1, tie_word_embeddings=False)
        return super().for_target(target, name, num_heads, num_layers, vocab, layer=layer, **extra)

    def extra_json(self) -> dict[str, Any]:
        return {"layer": self.layer.to_dict()}

    @classmethod
    def extra_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"layer": ModelConfig.from_dict(data["layer"])}


def init_random(params, generator: torch.Generator, std: float = 0.02) -> None:
    """A new layer's start: norm weights one, biases zero, every other weight random with
    ``std`` (``params``: (name, parameter) pairs)."""
    with torch.no_grad():
        for name, p in params:
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


class HeadSet(nn.Module):
    """What every head set shares: its config, its folder, the target it was made for.
    A subclass is built from its config alone (`config_class`)."""

    config_class: ClassVar[type[MedusaConfig]] = MedusaConfig
    config: MedusaConfig

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def check_target(self, target: Transformer, where: str | None = None) -> None:
        where = where or f"the {self.config.label} heads"
        check_target_facts(self.config.target, target, where)

    def save(self, folder: str | Path) -> Path:
        return write_head_folder(folder, self.state_dict(), self.config.to_json())

    @classmethod
    def load(cls, folder: str | Path):
        data, tensors, weights = read_head_folder(folder, cls.config_class.label)
        config = cls.config_class.from_json(data, str(Path(folder) / CONFIG_FILE))
        if int(config.target.get("hidden_size", 0)) < 1:
            raise HeadError(f"{weights}: its config names no hidden size")
        heads = cls(config)
        load_checked(heads, tensors, weights)
        return heads.to(torch.float32)


class ResBlock(nn.Module):
    """``x + SiLU(linear(x))``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(HeadSet):
    config_class = MedusaConfig

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        d = int(config.target["hidden_size"])
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(d) for _ in range(config.num_layers)))
            for _ in range(config.num_heads)
        )
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    def forward(self, target: Transformer, last: torch.Tensor) -> torch.Tensor:
        """Each head's output from the target's last-layer states ``last`` (rows, d)
        (before its final norm): (rows, K, d), to go through the LM head's rows."""
        x = target.norm(last.to(target.norm.weight.dtype))
        return torch.stack([block(x) for block in self.blocks], dim=-2)

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        num_heads: int = 4,
        num_layers: int = 1,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
    ) -> MedusaHeads:
        """New heads for ``target`` (called ``name``): each block the identity (zero weight
        and bias), drafting among ``draft_tokens`` (target ids; None: all); ``seed`` is
        the other kinds' (nothing here is random)."""
        c = target.config
        vocab = draft_vocab_ids(c.vocab_size, draft_tokens)
        heads = cls(MedusaConfig.for_target(target, name, num_heads, num_layers, vocab))
        with torch.no_grad():
            for p in heads.parameters():
                p.zero_()
            heads.d2t.copy_(vocab)
        return heads.to(torch.float32)
