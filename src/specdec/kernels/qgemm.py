"""ctypes binding of the native quantised matmul (``qgemm.cpp``)."""

from __future__ import annotations

import ctypes
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
    ]


@dataclass
class PackedWeight:
    """One weight matrix [N, K] in the kernel's tiled layout (see ``qgemm.cpp``).

    ``w[n, k] = d[sb] * sc[g] * u[n, k] - dm[sb] * m[g]`` with groups of ``group``
    values along K and super-blocks of ``sb_groups`` groups; ``sc``/``m`` are None
    when ``sb_groups == 1`` (then 1), and ``m`` is None when it equals ``sc``.
    """

    qs: torch.Tensor  # uint8 [tiles, K/32, 64*bits]
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
                lib.specdec_qgemm.restype = ctypes.c_int
                lib.specdec_qgemm.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.POINTER(_QWeight),
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int,
                ]
                lib.specdec_qgemm_path.restype = ctypes.c_int
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


def qgemm(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """``x [M, K] (float32) @ w.T (+ bias)`` → float32 [M, N]; ``out`` may be a column slice."""
    lib = _library()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be float32 [M, {w.k}], got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, w.n, dtype=torch.float32)
    elif out.shape != (m, w.n) or out.stride(1) != 1 or out.dtype != torch.float32:
        raise ValueError("out must be a float32 [M, N] view with unit column stride")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError("bias must be a contiguous float32 vector")
    if m == 0:
        return out
    rc = lib.specdec_qgemm(
        x.data_ptr(),
        m,
        x.stride(0),
        ctypes.byref(w.struct()),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        threads or torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"specdec_qgemm failed ({rc}) for {w.meta()}")
    return out
