"""A key/value cache indexed by slot, built for speculation.

Slot ``i`` holds the keys and values of the ``i``-th token the model has seen
(committed tokens first, then the ones written by the latest forward pass).
Positions (what RoPE sees) are separate from slots, so the nodes of a draft
tree can share a depth while occupying consecutive slots.

Two operations make speculation cheap:
- ``rollback(n)`` forgets the last ``n`` slots (a rejected chain suffix);
- ``keep(indices)`` keeps an ordered subset of the slots the latest pass wrote
  (the accepted path through a tree) and compacts them in place.
"""

from __future__ import annotations

import torch

from specdec.errors import InvalidRequestError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int = 256,
        max_capacity: int = 32768,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_capacity = max_capacity
        capacity = min(capacity, max_capacity)
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # slots in use
        self.fresh_start = 0  # first slot written by the latest pass
        self.fresh_count = 0  # how many slots that pass wrote

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self.k.nbytes + self.v.nbytes

    @property
    def used_bytes(self) -> int:
        return self.nbytes * self.length // max(self.capacity, 1)

    def begin_write(self, n: int) -> int:
        """Reserve ``n`` slots after the current length; returns the first slot."""
        needed = self.length + n
        if needed > self.capacity:
            if needed > self.max_capacity:
                raise InvalidRequestError(
                    f"sequence of {needed} tokens exceeds the context of {self.max_capacity}"
                )
            new_cap = min(max(needed, 2 * self.capacity), self.max_capacity)
            self._grow(new_cap)
        start = self.length
        self.length = needed
        self.fresh_start, self.fresh_count = start, n
        return start

    def reserve(self, capacity: int) -> None:
        """Allocate ``capacity`` slots now (no more than ``max_capacity``), so that passes up
        to it allocate nothing."""
        capacity = min(capacity, self.max_capacity)
        if capacity > self.capacity:
            self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor) -> torch.Tensor:
            new = t.new_zeros((*t.shape[:2], capacity, t.shape[3]))
            new[:, :, : self.length] = t[:, :, : self.length]
            return new

        self.k, self.v = grown(self.k), grown(self.v)

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` slots."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} slots")
        self.length -= n
        fresh_end = min(self.fresh_start + self.fresh_count, self.length)
        self.fresh_start = min(self.fresh_start, self.length)
        self.fresh_count = fresh_end - self.fresh_start

    def keep(self, indices: list[int] | torch.Tensor) -> None:
        """Keep the given slots of the latest pass (0-based within that pass, increasing), in order."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.k.device)
        m = idx.numel()
        if m and (
            int(idx.min()) < 0
            or int(idx.max()) >= self.fresh_count
            or (m > 1 and bool((idx[1:] <= idx[:-1]).any()))
        ):
            raise ValueError(
                f"keep indices must be increasing and within the last {self.fresh_count}"
            )
        start = self.fresh_start
        if m and not torch.equal(idx, torch.arange(m, device=idx.device)):
            src = idx + start
            # the cache may have been (re)allocated inside a forward's inference mode
            with torch.inference_mode():
                self.k[:, :, start : start + m] = self.k.index_select(2, src)
                self.v[:, :, start : start + m] = self.v.index_select(2, src)
        self.length = start + m
        self.fresh_count = m

    def reset(self) -> None:
        self.length = self.fresh_start = self.fresh_count = 0

    def release(self) -> None:
        """Give the memory back: empty, with no slots allocated (it grows again if used)."""
        self.k = self.k.new_zeros((*self.k.shape[:2], 0, self.k.shape[3]))
        self.v = self.v.new_zeros((*self.v.shape[:2], 0, self.v.shape[3]))
        self.reset()
