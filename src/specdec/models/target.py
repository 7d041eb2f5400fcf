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
