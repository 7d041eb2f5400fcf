"""ctypes binding of the native library (``qgemm.cpp``, built by the install step)."""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import SpecdecError

log = logging.getLogger(__name__)


class KernelUnavailableError(SpecdecError):
    """The native kernel library is missing or cannot be loaded."""


class _QWeight(ctypes.Structure):
    _fields_ = [
        ("qs", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("dm", ctypes.c_void_p),
        ("sc", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("K", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("sb_groups", ctypes.c_int32),
        ("offset", ctypes.c_int32),
    ]


@dataclass
class PackedWeight:
    """One weight matrix [N, K] in the kernel's tiled layout (see ``qgemm.cpp``).

    ``w[n, k] = d[sb] * sc[g] * u[n, k] - dm[sb] * m[g]`` with groups of ``group``
    values along K and super-blocks of ``sb_groups`` groups; ``sc``/``m`` are None
    when ``sb_groups == 1`` (then 1), and ``m`` is None when it equals ``sc``.
    """

    qs: torch.Tensor  # uint8 [tiles, K/32, 64*bits]  (bits 4, 6 or 8)
    d: torch.Tensor  # float16 [tiles, K/(group*sb_groups), 16]
    dm: torch.Tensor  # float16, same shape
    sc: torch.Tensor | None  # int8 [tiles, K/group, 16]
    m: torch.Tensor | None
    n: int
    k: int
    bits: int
    group: int
    sb_groups: int
    kind: str  # where it came from: a GGUF type name or our own scheme

    @functools.cached_property
    def offset(self) -> int:
        """``o`` where the offset is ``o`` times the scale (``dm = o * d`` exactly, ``m = sc``):
        Q6_K (32), Q4_0 (8), Q5_0 (16), Q8_0 and our int8 (128). The kernel then takes the
        offset off in integers, which is cheaper. 0 for real minima (Q4_K, Q4_1, int4)."""
        if self.m is not None:
            return 0
        d, dm = self.d.float(), self.dm.float()
        return next((o for o in (8, 16, 32, 128) if torch.equal(dm, d * o)), 0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.qs, self.d, self.dm, self.sc, self.m) if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qs": self.qs, "d": self.d, "dm": self.dm}
        if self.sc is not None:
            out["sc"] = self.sc
        if self.m is not None:
            out["m"] = self.m
        return out

    def meta(self) -> dict:
        return {
            "n": self.n,
            "k": self.k,
            "bits": self.bits,
            "group": self.group,
            "sb_groups": self.sb_groups,
            "kind": self.kind,
        }

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> PackedWeight:
        return cls(
            qs=tensors["qs"],
            d=tensors["d"],
            dm=tensors["dm"],
            sc=tensors.get("sc"),
            m=tensors.get("m"),
            **meta,
        )

    def struct(self) -> _QWeight:
        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        for t in (self.qs, self.d, self.dm, self.sc, self.m):
            if t is not None and not t.is_contiguous():
                raise ValueError("packed weight tensors must be contiguous")
        return _QWeight(
            ptr(self.qs),
            ptr(self.d),
            ptr(self.dm),
            ptr(self.sc),
            ptr(self.m),
            self.k,
            self.n,
            self.bits,
            self.group,
            self.sb_groups,
            self.offset,
        )


_LIB: ctypes.CDLL | None = None
_LOAD_ERROR: str | None = None


def _library() -> ctypes.CDLL:
    global _LIB, _LOAD_ERROR
    if _LIB is not None:
        return _LIB
    if _LOAD_ERROR is None:
        found = sorted(Path(__file__).parent.glob("_qgemm*.so"))
        if not found:
            _LOAD_ERROR = (
                "the native kernel is not built (no specdec/kernels/_qgemm*.so); "
                "reinstall specdec with `pip install -e .` or ./install.sh"
            )
        else:
            try:
                lib = ctypes.CDLL(str(found[0]))
                lib.specdec_qgemm_multi.restype = ctypes.c_int
                lib.specdec_qgemm_multi.argtypes = [
                    ctypes.c_void_p,  # x
                    ctypes.c_int64,  # M
                    ctypes.c_int64,  # ldx
                    ctypes.c_void_p,  # QWeight[nparts]
                    ctypes.c_int,  # nparts
                    ctypes.c_void_p,  # int64 cols[nparts]
                    ctypes.c_void_p,  # bias or NULL
                    ctypes.c_void_p,  # y
                    ctypes.c_int64,  # ldy
                    ctypes.c_int,  # threads
                ]
                lib.specdec_qgemm_path.restype = ctypes.c_int
                lib.specdec_layer.restype = ctypes.c_int
                lib.specdec_layer.argtypes = [
                    ctypes.c_void_p,  # h [n, d], updated in place
                    ctypes.c_int64,  # n
                    ctypes.c_void_p,  # LayerParams
                    ctypes.c_void_p,  # cos [n, D]
                    ctypes.c_void_p,  # sin
                    ctypes.c_void_p,  # keys [Hkv, capacity, D]
                    ctypes.c_void_p,  # values
                    ctypes.c_int64,  # capacity
                    ctypes.c_int64,  # start slot
                    ctypes.c_void_p,  # mask or NULL
                    ctypes.c_int,  # threads
                ]
                lib.specdec_layer_batch.restype = ctypes.c_int
                lib.specdec_layer_batch.argtypes = [
                    ctypes.c_void_p,  # h [n, d], updated in place
                    ctypes.c_int64,  # n
                    ctypes.c_void_p,  # LayerParams
                    ctypes.c_void_p,  # cos [n, D]
                    ctypes.c_void_p,  # sin
                    ctypes.c_void_p,  # LayerSegment[nseg]
                    ctypes.c_int64,  # nseg
                    ctypes.c_int,  # threads
                ]
                lib.specdec_vnni_peak.restype = ctypes.c_double
                lib.specdec_vnni_peak.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
                lib.specdec_read_gbs.restype = ctypes.c_double
                lib.specdec_read_gbs.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
                lib.specdec_attend.restype = ctypes.c_int
                lib.specdec_attend.argtypes = [
                    ctypes.c_void_p,  # q [H, n, D]
                    ctypes.c_int64,  # H
                    ctypes.c_int64,  # n
                    ctypes.c_int64,  # D
                    ctypes.c_void_p,  # keys [Hkv, >= L, D]
                    ctypes.c_void_p,  # values
                    ctypes.c_int64,  # Hkv
                    ctypes.c_int64,  # head stride (floats)
                    ctypes.c_int64,  # L
                    ctypes.c_void_p,  # mask [n, L] bytes or NULL
                    ctypes.c_void_p,  # out
                    ctypes.c_int64,  # ldo
                    ctypes.c_int,  # threads
                ]
                _LIB = lib
                return lib
            except OSError as e:
                _LOAD_ERROR = f"cannot load the native kernel {found[0]}: {e}"
    raise KernelUnavailableError(_LOAD_ERROR)


def require() -> None:
    """Raise `KernelUnavailableError` (with the reason) unless the library loads."""
    _library()


def available() -> bool:
    try:
        _library()
    except KernelUnavailableError:
        return False
    return True


def path() -> str:
    """Which code path the kernel takes on this CPU."""
    return "avx512-vnni" if _library().specdec_qgemm_path() else "portable"


class LinearKernel:
    """Packed parts side by side along N (and a bias), checked once, run by one native call.

    The layer's hot path: ``kernel(x)`` with ``x`` float32 [M, K] contiguous returns
    float32 [M, N]; nothing is validated per call (a decode step makes ~100 of them).
    """

    def __init__(self, parts: list[PackedWeight], bias: torch.Tensor | None = None) -> None:
        self._fn = _library().specdec_qgemm_multi
        if not parts or len(parts) > 8 or any(p.k != parts[0].k for p in parts):
            raise ValueError("1 to 8 parts of the same K")
        self.parts = parts
        self.k = parts[0].k
        self.n = sum(p.n for p in parts)
        self._structs = (_QWeight * len(parts))(*(p.struct() for p in parts))
        self._cols = torch.tensor([sum(p.n for p in parts[:i]) for i in range(len(parts))])
        if bias is not None:
            bias = bias.detach().to(torch.float32).contiguous()
            if bias.shape != (self.n,):
                raise ValueError(f"bias must have {self.n} values, got {tuple(bias.shape)}")
        self.bias = bias
        self._args = (
            ctypes.addressof(self._structs),
            len(parts),
            self._cols.data_ptr(),
            None if bias is None else bias.data_ptr(),
        )

    def __deepcopy__(self, memo: dict) -> LinearKernel:  # ctypes pointers cannot be copied
        return LinearKernel(copy.deepcopy(self.parts, memo), copy.deepcopy(self.bias, memo))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m = x.shape[0]
        if out is None:
            out = torch.empty(m, self.n, dtype=torch.float32)
        if m:
            structs, nparts, cols, bias = self._args
            rc = self._fn(
                x.data_ptr(),
                m,
                x.stride(0),
                structs,
                nparts,
                cols,
                bias,
                out.data_ptr(),
                out.stride(0),
                torch.get_num_threads(),
            )
            if rc:
                raise RuntimeError(f"specdec_qgemm_multi failed ({rc})")
        return out


def vnni_peak_gmacs(
    threads: int | None = None, iters: int = 3_000_000, float_ops_per_8: int = 0
) -> float:
    """Measured peak of int8 multiply-adds (vpdpbusd) on ``threads`` cores, in G/s, with
    ``float_ops_per_8`` (0-4) float multiply-adds beside every 8 (the kernel's per-group
    work: 3 for Q4_K, 2 for the offset formats, 4 for Q6_K's 16-value groups); 0 where the
    VNNI path cannot run. About 0.1 s."""
    return _library().specdec_vnni_peak(iters, threads or torch.get_num_threads(), float_ops_per_8)


def read_bandwidth_gbs(gib: float = 1.0, threads: int | None = None, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of ``repeats`` passes of ``threads`` cores streaming
    their halves of a ``gib`` GiB buffer; 0 if it cannot be allocated."""
    return _library().specdec_read_gbs(
        int(gib * (1 << 30)), threads or torch.get_num_threads(), repeats
    )


def qgemm(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] (float32) @ w.T (+ bias)`` → float32 [M, N]; ``out`` may be a column slice.

    The checked, one-off form of `LinearKernel` (tests, benchmarks)."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be float32 [M, {w.k}], got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is not None and (
        out.shape != (x.shape[0], w.n) or out.stride(1) != 1 or out.dtype != torch.float32
    ):
        raise ValueError("out must be a float32 [M, N] view with unit column stride")
    return LinearKernel([w], bias)(x, out)


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of ``q`` [H, n, D] over the first ``length`` slots of ``keys`` /
    ``values`` [Hkv, capacity, D] (float32, contiguous), ``mask`` [n, length] bool or None;
    returns [n, H*D] (rows side by side by head, as the output projection reads them)."""
    h, n, d = q.shape
    hkv, capacity = keys.shape[0], keys.shape[1]
    if not (q.is_contiguous() and keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("q, keys and values must be contiguous")
    if mask is not None:
        mask = mask.contiguous()
        if mask.shape != (n, length) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{n}, {length}]")
    out = torch.empty(n, h * d, dtype=torch.float32)
    rc = _library().specdec_attend(
        q.data_ptr(),
        h,
        n,
        d,
        keys.data_ptr(),
        values.data_ptr(),
        hkv,
        capacity * d,
        length,
        None if mask is None else mask.data_ptr(),
        out.data_ptr(),
        h * d,
        torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"specdec_attend failed ({rc})")
    return out


class _LinearParts(ctypes.Structure):
    _fields_ = [
        ("parts", ctypes.c_void_p),
        ("cols", ctypes.c_void_p),
        ("nparts", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
    ]


class _LayerParams(ctypes.Structure):
    _fields_ = [
        ("qkv", _LinearParts),
        ("wo", _LinearParts),
        ("w13", _LinearParts),
        ("w2", _LinearParts),
        ("attn_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
        ("d", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("ffn", ctypes.c_int64),
        ("eps", ctypes.c_float),
    ]


class _LayerSegment(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("kc", ctypes.c_void_p),
        ("vc", ctypes.c_void_p),
        ("capacity", ctypes.c_int64),
        ("start", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
    ]


class LayerKernel:
    """A whole decoder layer (``layer.cpp``) with quantised linears, in one native call.

    ``kernel(h, cos, sin, keys, values, start, mask)`` updates the residual stream ``h``
    [n, d] in place and writes the layer's keys and values into slots
    ``start..start+n-1`` of ``keys``/``values`` [Hkv, capacity, D] (all float32,
    contiguous); ``mask`` is None or bool [n, start+n].
    """

    def __init__(
        self,
        qkv: LinearKernel,
        wo: LinearKernel,
        w13: LinearKernel,
        w2: LinearKernel,
        attn_norm: torch.Tensor,
        ffn_norm: torch.Tensor,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        self._fn = _library().specdec_layer
        self.linears = (qkv, wo, w13, w2)
        self.norms = tuple(t.detach().to(torch.float32).contiguous() for t in (attn_norm, ffn_norm))
        self.shape = (heads, kv_heads, head_dim, eps)
        d = wo.n
        if qkv.n != (heads + 2 * kv_heads) * head_dim or w13.n != 2 * w2.k or w2.n != d:
            raise ValueError("the linears do not fit the layer's shape")

        def parts(lin: LinearKernel) -> _LinearParts:
            structs, nparts, cols, bias = lin._args
            return _LinearParts(structs, cols, nparts, bias)

        self._params = _LayerParams(
            *(parts(lin) for lin in self.linears),
            self.norms[0].data_ptr(),
            self.norms[1].data_ptr(),
            d,
            heads,
            kv_heads,
            head_dim,
            w2.k,
            eps,
        )
        self._ref = ctypes.addressof(self._params)

    def __deepcopy__(self, memo: dict) -> LayerKernel:  # ctypes pointers cannot be copied
        linears = copy.deepcopy(self.linears, memo)
        norms = copy.deepcopy(self.norms, memo)
        return LayerKernel(*linears, *norms, *self.shape)

    def __call__(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> None:
        rc = self._fn(
            h.data_ptr(),
            h.shape[0],
            self._ref,
            cos.data_ptr(),
            sin.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.shape[1],
            start,
            None if mask is None else mask.data_ptr(),
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"specdec_layer failed ({rc})")

    def batch(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: list[tuple[int, torch.Tensor, torch.Tensor, int, torch.Tensor | None]],
    ) -> None:
        """Several sequences in one call: ``segments`` lists each one's (rows, keys, values,
        start, mask), its rows consecutive in ``h`` in that order. The linears read their
        weights once for all rows; each sequence attends to its own cache."""
        segs = (_LayerSegment * len(segments))()
        for s, (n, keys, values, start, mask) in enumerate(segments):
            segs[s] = _LayerSegment(
                n,
                keys.data_ptr(),
                values.data_ptr(),
                keys.shape[1],
                start,
                None if mask is None else mask.data_ptr(),
            )
        rc = _library().specdec_layer_batch(
            h.data_ptr(),
            h.shape[0],
            self._ref,
            cos.data_ptr(),
            sin.data_ptr(),
            ctypes.addressof(segs),
            len(segments),
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"specdec_layer_batch failed ({rc})")
