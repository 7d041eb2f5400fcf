"""Weights into the layout of ``qgemm.cpp``: GGUF blocks exactly, or floats quantised by us.

Every GGUF type read here maps onto ``w = d*sc*u - dm*m`` without rounding
(products of an fp16 and a 6- or 8-bit integer are exact in float32), so the
kernel computes with the very weights the file holds:

| GGUF  | codes u         | group, super-block | d, dm per super-block | sc, m per group |
|-------|-----------------|--------------------|-----------------------|-----------------|
| Q4_K  | 4-bit 0..15     | 32, 8 groups       | d, dmin               | 6-bit scale, min|
| Q6_K  | 6-bit 0..63     | 16, 16 groups      | d, 32*d               | int8 scale (m=sc)|
| Q4_0  | 4-bit           | 32, 1              | d, 8*d                | -               |
| Q4_1  | 4-bit           | 32, 1              | d, -m                 | -               |
| Q5_0  | 6-bit (5 used)  | 32, 1              | d, 16*d               | -               |
| Q8_0  | 8-bit (q+128)   | 32, 1              | d, 128*d              | -               |

Our own schemes for float weights: ``int8`` (symmetric per 32 values, the Q8_0
rule) and ``int4`` (asymmetric per 32 values, the Q4_1 rule, fp16 scale and min).
"""

from __future__ import annotations

import numpy as np
import torch

from specdec.kernels.native import PackedWeight

TILE = 16


class UnsupportedQuantError(ValueError):
    pass


def _f16(a: np.ndarray, off: int) -> np.ndarray:
    """The fp16 at byte ``off`` of each block (last axis is the block's bytes)."""
    return a[..., off : off + 2].copy().view(np.float16)[..., 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1/Q5_0 order: element j in the low nibble of byte j, j+16 in its high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def split_gguf(raw: np.ndarray, type_name: str, n: int, k: int) -> dict:
    """A GGUF tensor's bytes ([n, bytes per row] uint8) → codes, scales and the format."""
    if k % 32:
        raise UnsupportedQuantError(f"rows of {k} values are not a multiple of 32")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if type_name == "Q4_K":
        b = raw.reshape(n, k // 256, 144)
        s = b[..., 4:16].astype(np.uint8)
        lo = s[..., 0:4]
        mid = s[..., 4:8]
        hi = s[..., 8:12]
        sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
        mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
        qs = b[..., 16:].reshape(n, k // 256, 4, 1, 32)
        u = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
        return dict(
            u=u,
            d=_f16(b, 0),
            dm=_f16(b, 2),
            sc=sc.reshape(n, k // 32).astype(np.int8),
            m=mn.reshape(n, k // 32).astype(np.int8),
            bits=4,
            group=32,
            sb_groups=8,
        )
    if type_name == "Q6_K":
        nb = k // 256
        b = raw.reshape(n, nb, 210)
        ql = b[..., :128].reshape(n, nb, 2, 2, 32)
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
        lo = np.stack([ql & 0x0F, ql >> 4], axis=3).reshape(n, nb, 2, 4, 32)
        shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        hi = (qh >> shifts) & 3
        u = (lo | (hi << 4)).reshape(n, k)
        d = _f16(b, 208)
        return dict(
            u=u,
            d=d,
            dm=(d.astype(np.float32) * 32).astype(np.float16),
            sc=b[..., 192:208].copy().view(np.int8).reshape(n, k // 16),
            m=None,
            bits=6,
            group=16,
            sb_groups=16,
        )
    sizes = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q8_0": 34}
    if type_name not in sizes:
        raise UnsupportedQuantError(f"GGUF type {type_name} has no packed form")
    b = raw.reshape(n, k // 32, sizes[type_name])
    d = _f16(b, 0)
    if type_name == "Q8_0":
        u = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return _flat(u.reshape(n, k), d, d.astype(np.float32) * 128, 8)
    if type_name == "Q4_0":
        return _flat(_nibbles_32(b[..., 2:]).reshape(n, k), d, d.astype(np.float32) * 8, 4)
    if type_name == "Q4_1":
        return _flat(_nibbles_32(b[..., 4:]).reshape(n, k), d, -_f16(b, 2).astype(np.float32), 4)
    qh = b[..., 2:6].copy().view("<u4")[..., 0]  # Q5_0: bit j is element j's fifth bit
    high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    u = _nibbles_32(b[..., 6:]) | (high << 4)
    return _flat(u.reshape(n, k), d, d.astype(np.float32) * 16, 6)


def _flat(u: np.ndarray, d: np.ndarray, dm: np.ndarray, bits: int) -> dict:
    dm16 = dm.astype(np.float16)
    if not np.array_equal(dm16.astype(np.float32), dm.astype(np.float32)):
        raise UnsupportedQuantError("a block's offset does not fit float16")
    return dict(u=u, d=d, dm=dm16, sc=None, m=None, bits=bits, group=32, sb_groups=1)


def quantise_float(w: torch.Tensor, scheme: str) -> dict:
    """A float weight [n, k] → our ``int8`` (symmetric) or ``int4`` (asymmetric) per 32 values."""
    n, k = w.shape
    if k % 32:
        raise UnsupportedQuantError(f"rows of {k} values are not a multiple of 32")
    x = w.detach().to(torch.float32).reshape(n, k // 32, 32)
    if scheme == "int8":
        d = (x.abs().amax(-1) / 127).to(torch.float16)
        inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        q = torch.round(x * inv[..., None]).clamp(-127, 127).to(torch.int16) + 128
        dn = d.numpy()
        return _flat(q.to(torch.uint8).reshape(n, k).numpy(), dn, dn.astype(np.float32) * 128, 8)
    if scheme == "int4":
        lo, hi = x.amin(-1), x.amax(-1)
        mn = lo.to(torch.float16)
        d = ((hi - mn.float()) / 15).to(torch.float16)
        inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        q = torch.round((x - mn.float()[..., None]) * inv[..., None]).clamp(0, 15)
        u = q.to(torch.uint8).reshape(n, k).numpy()
        return _flat(u, d.numpy(), -mn.float().numpy(), 4)
    raise UnsupportedQuantError(f"unknown quantisation {scheme!r}")


def dequantise(parts: dict) -> np.ndarray:
    """The float32 weights ``parts`` stand for (the reference the kernel is tested against)."""
    u = parts["u"].astype(np.float32)
    n, k = u.shape
    g, s = parts["group"], parts["sb_groups"]
    d = np.repeat(parts["d"].astype(np.float32), s, axis=1)  # per group
    dm = np.repeat(parts["dm"].astype(np.float32), s, axis=1)
    sc = parts["sc"]
    m = parts["m"] if parts["m"] is not None else sc
    scale = d if sc is None else d * sc.astype(np.float32)
    mins = dm if sc is None else dm * m.astype(np.float32)
    return (u.reshape(n, k // g, g) * scale[..., None] - mins[..., None]).reshape(n, k)


def pack(parts: dict, kind: str) -> PackedWeight:
    """Codes and scales ([n, ...] row-major) → the tiled layout."""
    u = parts["u"]
    n, k = u.shape
    tiles = -(-n // TILE)
    pad = tiles * TILE - n

    def rows(a: np.ndarray) -> np.ndarray:
        return np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a

    up = rows(u).reshape(tiles, TILE, k // 32, 8, 4)  # [t, j, c, s, b]
    if parts["bits"] == 8:
        qs = up.transpose(0, 2, 3, 1, 4).reshape(tiles, k // 32, 512)
    else:
        low = up & 0x0F
        halves = low.reshape(tiles, TILE, k // 32, 4, 2, 4)  # [t, j, c, i, half, b]
        h = halves.transpose(0, 2, 3, 1, 5, 4)  # [t, c, i, j, b, half]
        qs = (h[..., 0] | (h[..., 1] << 4)).reshape(tiles, k // 32, 256)
        if parts["bits"] == 6:  # bits 4-5 of steps 4i..4i+3 in one byte, two bits each
            high = (up >> 4).reshape(tiles, TILE, k // 32, 2, 4, 4)  # [t, j, c, i, t4, b]
            high = high.transpose(0, 2, 3, 1, 5, 4)  # [t, c, i, j, b, t4]
            shifts = np.array([0, 2, 4, 6], np.uint8)
            plane = np.bitwise_or.reduce(high << shifts, axis=-1).astype(np.uint8)
            qs = np.concatenate([qs, plane.reshape(tiles, k // 32, 128)], axis=-1)

    def per_tile(a: np.ndarray | None) -> torch.Tensor | None:
        if a is None:
            return None
        a = rows(a)
        return torch.from_numpy(np.ascontiguousarray(a.reshape(tiles, TILE, -1).transpose(0, 2, 1)))

    return PackedWeight(
        qs=torch.from_numpy(np.ascontiguousarray(qs, dtype=np.uint8)),
        d=per_tile(parts["d"].astype(np.float16)),
        dm=per_tile(parts["dm"].astype(np.float16)),
        sc=per_tile(parts["sc"]),
        m=per_tile(parts["m"]),
        n=n,
        k=k,
        bits=parts["bits"],
        group=parts["group"],
        sb_groups=parts["sb_groups"],
        kind=kind,
    )


def unpack(w: PackedWeight) -> dict:
    """The codes and scales a packed weight holds, row-major (the inverse of `pack`)."""
    tiles, nc = w.qs.shape[0], w.k // 32
    qs = w.qs.numpy()
    if w.bits == 8:
        up = qs.reshape(tiles, nc, 8, TILE, 4).transpose(0, 3, 1, 2, 4)  # [t, j, c, s, b]
    else:
        low = qs[..., :256].reshape(tiles, nc, 4, TILE, 4)  # [t, c, i, j, b]
        halves = np.stack([low & 0x0F, low >> 4], axis=-1)  # [t, c, i, j, b, half]
        up = halves.transpose(0, 3, 1, 2, 5, 4).reshape(tiles, TILE, nc, 8, 4)
        if w.bits == 6:
            plane = qs[..., 256:].reshape(tiles, nc, 2, TILE, 4)  # [t, c, i, j, b]
            shifts = np.array([0, 2, 4, 6], np.uint8)
            high = (plane[..., None] >> shifts) & 3  # [t, c, i, j, b, t4]
            up = up | (high.transpose(0, 3, 1, 2, 5, 4).reshape(tiles, TILE, nc, 8, 4) << 4)
    u = up.reshape(tiles * TILE, w.k)[: w.n]

    def rows(t: torch.Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        return t.numpy().transpose(0, 2, 1).reshape(tiles * TILE, -1)[: w.n]

    return dict(
        u=u,
        d=rows(w.d),
        dm=rows(w.dm),
        sc=rows(w.sc),
        m=rows(w.m),
        bits=w.bits,
        group=w.group,
        sb_groups=w.sb_groups,
    )


def select_rows(w: PackedWeight, rows: np.ndarray) -> PackedWeight:
    """A packed weight of only the output rows ``rows`` of ``w`` (in that order): a column's
    result does not depend on its neighbours, so its values are bit for bit those of ``w``."""
    parts = unpack(w)
    picked = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in parts.items()}
    return pack(picked, w.kind)
