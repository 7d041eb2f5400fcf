"""The one small interface the engine talks to, and its native implementation.

A target runs new tokens (with positions and an optional tree mask over the last
m >= n cache slots, so a tree can be extended level by level) on top of what its
cache holds, returns logits for the rows asked for, and can forget
(`rollback`) or compact (`keep`) what the latest pass wrote.
"""

from __future__ import annotations

from typing import Protocol

import torch

from specdec.models.config import ModelConfig
from specdec.models.transformer import Transformer


class Target(Protocol):
    config: ModelConfig

    @property
    def length(self) -> int: ...

    @property
    def max_length(self) -> int: ...

    def reset(self) -> None: ...

    def forward(
        self,
        tokens: list[int],
        positions: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_rows: slice | list[int] | None = None,
    ) -> torch.Tensor: ...

    def rollback(self, n: int) -> None: ...

    def keep(self, indices: list[int]) -> None: ...


class NativeTarget:
    """A `Transformer` and its KV cache for one sequence."""

    def __init__(self, model: Transformer, capacity: int = 512) -> None:
        self.model = model
        self.config = model.config
        self.cache = model.new_cache(capacity=capacity)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def max_length(self) -> int:
        return self.cache.max_capacity

    def reset(self) -> None:
        self.cache.reset()

    def forward(self, tokens, positions=None, attn_mask=None, logits_rows=None, **kw):
        dev = self.model.device
        if positions is None:
            positions = range(self.cache.length, self.cache.length + len(tokens))
        t = torch.as_tensor(tokens, dtype=torch.long, device=dev)
        p = torch.as_tensor(list(positions), dtype=torch.long, device=dev)
        return self.model(t, p, self.cache, attn_mask=attn_mask, logits_rows=logits_rows, **kw)

    def rollback(self, n: int) -> None:
        self.cache.rollback(n)

    def keep(self, indices: list[int]) -> None:
        self.cache.keep(indices)


class VocabSubset(NativeTarget):
    """A native target whose logits are computed for ``rows`` of the vocabulary only (the
    LM head restricted to those rows, at that fraction of its cost) and are -inf elsewhere:
    argmax, top-k and softmax downstream see no mass outside the subset. It shares the
    model and the KV cache of ``inner``. For a draft model: what it proposes is still
    checked by the full target, so the output does not change; under sampling its
    distribution q is exactly the one it sampled from (zero outside)."""

    def __init__(self, inner: NativeTarget, rows: torch.Tensor) -> None:
        self.model, self.config, self.cache = inner.model, inner.config, inner.cache
        self.rows = torch.unique(rows.to(torch.long))  # sorted, as the head expects
        self.vocab = inner.config.vocab_size
        if self.rows.numel() == 0 or int(self.rows[0]) < 0 or int(self.rows[-1]) >= self.vocab:
            raise ValueError(f"vocabulary rows must lie in [0, {self.vocab})")

    def forward(self, tokens, positions=None, attn_mask=None, logits_rows=None, **kw):
        part = super().forward(tokens, positions, attn_mask, logits_rows, vocab_rows=self.rows)
        out = torch.full(
            (part.shape[0], self.vocab), float("-inf"), dtype=part.dtype, device=part.device
        )
        out[:, self.rows] = part
        return out
