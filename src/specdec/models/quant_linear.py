"""Quantised linear layers (the native ``qgemm`` kernel), swapped in as modules.

``--quant`` choices:
- ``gguf``: the GGUF file's own block types, exactly (Q4_K_M is a mix of Q4_K
  and Q6_K): no second rounding of the weights;
- ``int8`` / ``int4``: our per-32 schemes (`specdec.kernels.packing`), from the
  float weights (a GGUF's dequantised ones, or a safetensors model's);
- ``none``: float weights.

Activations are quantised per row and per 32 values to int8 inside the kernel,
so a row's output never depends on the other rows of the pass: verifying k
tokens gives the same logits as k one-token passes. Packed weights are cached
beside the converted model (``packed-<quant>.safetensors``), not rebuilt per load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from specdec.errors import UnsupportedModelError
from specdec.kernels import KernelUnavailableError, PackedWeight, available, native
from specdec.kernels import packing as P
from specdec.kernels.native import LayerKernel, LinearKernel
from specdec.kernels.native import require as require_kernel
from specdec.models.gguf_file import open_gguf, unpermute
from specdec.models.progress import Progress

log = logging.getLogger(__name__)

QUANTS = ("auto", "none", "gguf", "int8", "int4")
# GGUF block types the kernel packs as they are (see specdec.kernels.packing)
GGUF_PACKED = ("Q4_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q8_0")
PACK_VERSION = 2  # bump when the packed layout changes

# runtime module → the GGUF tensors it fuses, in order
_GGUF_PARTS = {
    "attn.wqkv": ("attn_q", "attn_k", "attn_v"),
    "attn.wo": ("attn_output",),
    "ffn.w13": ("ffn_gate", "ffn_up"),
    "ffn.w2": ("ffn_down",),
}


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W in one or more packed parts side by side along N."""

    def __init__(self, parts: list[PackedWeight], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.kernel = LinearKernel(parts, bias)
        self.parts = parts
        self.bias = self.kernel.bias
        self.in_features = self.kernel.k
        self.out_features = self.kernel.n

    @property
    def weight_nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, rows: torch.Tensor) -> QuantLinear:
        """This layer restricted to the output rows ``rows`` (increasing), e.g. the LM head
        over a subset of the vocabulary: built once per subset (the last four are kept),
        each row's values bit for bit those of the whole layer."""
        idx = rows.to(torch.int64).reshape(-1)
        key = idx.numpy().tobytes()
        cache = self.__dict__.setdefault("_row_subsets", {})
        if key not in cache:
            ok = idx.numel() > 0 and int(idx[0]) >= 0 and int(idx[-1]) < self.out_features
            if not ok or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
                raise ValueError(f"rows must be increasing indices below {self.out_features}")
            parts = []
            for part, n0 in zip(self.parts, self.kernel._cols.tolist(), strict=True):
                mine = idx[(idx >= n0) & (idx < n0 + part.n)] - n0
                if mine.numel():
                    parts.append(P.select_rows(part, mine.numpy()))
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = QuantLinear(parts, None if self.bias is None else self.bias[idx])
        return cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        y = self.kernel(x2)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        kinds = "+".join(p.kind for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, {kinds}"


def resolve_quant(quant: str, gguf: Path | None, folder: Path | None = None) -> str:
    """``auto``: ``gguf`` for a GGUF file whose linears are block-quantised, on a CPU where
    the kernel runs its AVX-512 VNNI path (measured there: 1.5B Q4_K_M decodes at
    llama.cpp's speed, ~5x bfloat16); ``none`` otherwise (float files, other CPUs).
    ``folder`` (the file's converted folder) caches the linears' block type: reading it
    from the GGUF parses the whole header, ~7 s for the 1.5B's."""
    if quant != "auto":
        return quant
    if gguf is None or not available() or native.path() != "avx512-vnni":
        return "none"
    return "gguf" if _linear_block_type(gguf, folder) in GGUF_PACKED else "none"


def _linear_block_type(gguf: Path, folder: Path | None) -> str | None:
    cached = None if folder is None else folder / "linear_block_type"
    if cached is not None and cached.exists():
        return cached.read_text().strip() or None
    kind = next(
        (t.tensor_type.name for t in open_gguf(gguf).tensors if t.name.endswith("ffn_up.weight")),
        "",
    )
    if cached is not None:
        cached.write_text(kind)
    return kind or None


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UnsupportedModelError(
            f"unknown quantisation {quant!r} (choose from {', '.join(QUANTS)})"
        )
    if quant != "none":
        try:
            require_kernel()
        except KernelUnavailableError as e:
            raise UnsupportedModelError(f"--quant {quant}: {e}") from None


def linear_names(num_layers: int) -> Iterator[str]:
    for i in range(num_layers):
        for name in _GGUF_PARTS:
            yield f"layers.{i}.{name}"
    yield "lm_head"


def _merge_same_kind(parts: list[dict], kinds: list[str]) -> list[tuple[dict, str]]:
    """Neighbouring parts of one format are packed as one matrix (one kernel call)."""
    out: list[tuple[dict, str]] = []
    fields = ("bits", "group", "sb_groups")
    for part, kind in zip(parts, kinds, strict=True):
        if out and out[-1][1] == kind and all(out[-1][0][f] == part[f] for f in fields):
            prev = out[-1][0]
            merged = dict(prev)
            for key in ("u", "d", "dm", "sc", "m"):
                merged[key] = None if prev[key] is None else np.concatenate([prev[key], part[key]])
            out[-1] = (merged, kind)
        else:
            out.append((part, kind))
    return out


def gguf_parts(reader, cfg, name: str) -> list[PackedWeight]:
    """The packed parts of runtime module ``name`` from a GGUF file's own blocks."""
    tensors = {t.name: t for t in reader.tensors}
    if name == "lm_head":
        gg = ["output.weight" if "output.weight" in tensors else "token_embd.weight"]
    else:
        layer, module = name.split(".", 2)[1], name.split(".", 2)[2]
        gg = [f"blk.{layer}.{t}.weight" for t in _GGUF_PARTS[module]]
    raw_parts, kinds = [], []
    for g in gg:
        t = tensors[g]
        k, n = int(t.shape[0]), int(t.shape[1])
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16"):
            w = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(n, k).copy())
            parts, kind = P.quantise_float(w, "int8"), "int8"
        else:
            parts = P.split_gguf(np.asarray(t.data), kind, n, k)
        if cfg.permuted_qk_in_gguf and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_heads if "attn_q" in g else cfg.num_kv_heads
            order = unpermute(torch.arange(n), heads).numpy()
            parts = {f: (v[order] if isinstance(v, np.ndarray) else v) for f, v in parts.items()}
        raw_parts.append(parts)
        kinds.append(kind)
    return [P.pack(p, kind) for p, kind in _merge_same_kind(raw_parts, kinds)]


def float_parts(weight: torch.Tensor, quant: str) -> list[PackedWeight]:
    return [P.pack(P.quantise_float(weight, quant), quant)]


def quantise_linears(
    model: nn.Module,
    packed: Callable[[str], list[PackedWeight] | None],
) -> int:
    """Replace the named linears of ``model`` by `QuantLinear`s built from ``packed(name)``
    (None keeps the float layer); returns how many were replaced."""
    count = 0
    for name in linear_names(len(model.layers)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        parts = packed(name)
        if parts is None:
            continue
        bias = getattr(lin, "bias", None)
        setattr(parent, attr, QuantLinear(parts, bias))
        count += 1
    return count


def attach_native_layers(model: nn.Module) -> bool:
    """Give a float32 model whose layers' linears are all quantised one native call per
    layer (`specdec.kernels.native.LayerKernel`); returns whether it did."""
    if model.dtype != torch.float32:
        return False
    kernels = []
    cfg = model.config
    for block in model.layers:
        linears = (block.attn.wqkv, block.attn.wo, block.ffn.w13, block.ffn.w2)
        if not all(isinstance(m, QuantLinear) for m in linears):
            return False
        kernels.append(
            LayerKernel(
                *(m.kernel for m in linears),
                block.attn_norm.weight,
                block.ffn_norm.weight,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.rms_norm_eps,
            )
        )
    model.native_layers = kernels
    return True


# --------------------------------------------------------------------------- cache
def save_packed(path: Path, packed: dict[str, list[PackedWeight]], quant: str) -> None:
    tensors, meta = {}, {}
    for name, parts in packed.items():
        meta[name] = [p.meta() for p in parts]
        for i, p in enumerate(parts):
            for key, t in p.tensors().items():
                tensors[f"{name}.{i}.{key}"] = t
    header = {"specdec_pack": json.dumps({"version": PACK_VERSION, "quant": quant, "parts": meta})}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_packed(path: Path, quant: str) -> dict[str, list[PackedWeight]] | None:
    """The cached packed weights, or None when absent or from another layout version."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as st:
            info = json.loads(st.metadata()["specdec_pack"])
            if info.get("version") != PACK_VERSION or info.get("quant") != quant:
                return None
            out = {}
            for name, metas in info["parts"].items():
                parts = []
                for i, meta in enumerate(metas):
                    prefix = f"{name}.{i}."
                    tensors = {
                        k[len(prefix) :]: st.get_tensor(k)
                        for k in st.keys()
                        if k.startswith(prefix)
                    }
                    parts.append(PackedWeight.from_parts(meta, tensors))
                out[name] = parts
            return out
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable packed weights %s (%s)", path, e)
        return None


def _tied_name(name: str, cfg) -> str:
    """The float tensor behind a linear (a tied LM head is the embedding)."""
    return "embed" if name == "lm_head" and cfg.tie_word_embeddings else name


def pack_gguf_model(
    gguf_path: Path,
    cfg,
    quant: str,
    float_weight: Callable[[str], torch.Tensor],
    progress: Progress | None = None,
) -> dict[str, list[PackedWeight]]:
    """Every linear of a GGUF model in ``quant`` form (``gguf``: the file's blocks);
    ``float_weight(tensor name)`` gives the dequantised weights for int8/int4;
    ``progress`` draws a bar (on a terminal)."""
    reader = open_gguf(gguf_path) if quant == "gguf" else None
    names = list(linear_names(cfg.num_layers))
    bar = (progress or Progress(False)).bar(
        total=len(names),
        desc=f"packing weights for --quant {quant} (once)",
        unit="matrix",
        leave=False,
    )
    out = {}
    for name in names:
        if reader is not None:
            out[name] = gguf_parts(reader, cfg, name)
        else:
            _pack_float(out, name, float_weight(f"{_tied_name(name, cfg)}.weight"), quant)
        bar.update(1)
    bar.close()
    return out


def pack_float_model(
    state: dict[str, torch.Tensor], cfg, quant: str
) -> dict[str, list[PackedWeight]]:
    """Every linear of a float state dict (the runtime's names) in ``quant`` form."""
    out: dict[str, list[PackedWeight]] = {}
    for name in linear_names(cfg.num_layers):
        _pack_float(out, name, state[f"{_tied_name(name, cfg)}.weight"], quant)
    return out


def _pack_float(out: dict, name: str, weight: torch.Tensor, quant: str) -> None:
    if weight.shape[1] % 32:
        log.warning(
            "%s stays in float: rows of %d values (--quant needs multiples of 32)",
            name,
            weight.shape[1],
        )
        return
    out[name] = float_parts(weight, quant)
