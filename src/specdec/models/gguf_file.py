"""Reading GGUF files: the header check, the reader, metadata, the model config and tensors.

What both the float conversion (`specdec.models.loading`) and the quantised linears
(`specdec.models.quant_linear`) need from a GGUF file, in one place: tensor names
follow llama.cpp's (``token_embd``, ``blk.N.attn_q`` ...), whose q/k rows are
interleaved (`unpermute` undoes that).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from specdec.models.config import ModelConfig

MAGIC = b"GGUF"


def check_file(path: Path) -> None:
    """Raise `ModelNotFoundError` when ``path`` is absent, `ModelFormatError` when it does
    not start with the GGUF magic (cheap: reads 4 bytes)."""
    if not path.exists():
        raise ModelNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (bad magic)")


def content_key(path: Path) -> str:
    """A content key that is cheap for GGUFs of a GB: size and first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


_last_opened: tuple[tuple, Any] | None = None  # (file identity, reader) of the last open_gguf


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); a damaged file is a
    `ModelFormatError`. Parsing the header of a 1.5B model's file takes seconds (~9 s on a
    2-core machine), so the last reader is kept and returned again while the file is the
    same (path, size, modification time, inode): a first run converts, packs and checks
    block types from one parse."""
    global _last_opened
    try:
        st = Path(path).stat()
        identity = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        identity = None  # the reader reports the problem
    if identity is not None and _last_opened is not None and _last_opened[0] == identity:
        return _last_opened[1]
    import gguf  # only GGUF files need it (with its quant tables); keeps other loads light

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelFormatError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})"
        ) from None
    if identity is not None:
        _last_opened = (identity, reader)
    return reader


def metadata(reader: Any) -> dict[str, Any]:
    """The reader's key/value fields, without the tokenizer's large arrays."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(
            ("tokens", "token_type", "merges", "scores")
        ):
            continue  # large arrays, not needed for the config
        try:
            meta[key] = field.contents()
        except Exception:  # a field type the reader cannot decode is not one we need
            continue
    return meta


def tensors(reader: Any) -> dict[str, Any]:
    """The reader's tensors by name."""
    return {t.name: t for t in reader.tensors}


def read_config(reader: Any, path: Path) -> ModelConfig:
    """The model config from the file's metadata (vocabulary size and tied head from its
    tensors); files this runtime cannot run are refused here."""
    names = tensors(reader)
    embed = names.get("token_embd.weight")
    if embed is None:
        raise ModelFormatError(f"{path}: GGUF file has no token_embd.weight")
    cfg = ModelConfig.from_gguf_metadata(metadata(reader), vocab_size=int(embed.shape[-1]))
    if "rope_freqs.weight" in names:  # Llama 3.x frequency factors: not implemented natively
        raise UnsupportedModelError(
            f"{path}: rope frequency factors (rope_freqs.weight) are not supported"
        )
    tied = "output.weight" not in names
    return ModelConfig.from_dict({**cfg.to_dict(), "tie_word_embeddings": tied})


def dequantize(tensor: Any) -> torch.Tensor:
    """A tensor of the file as a writable float32 torch tensor of its own (never a view of
    the memory-mapped file)."""
    import gguf  # see open_gguf

    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be dequantised"
        ) from None
    arr = np.asarray(arr, dtype=np.float32)
    if not (arr.flags.writeable and arr.flags.c_contiguous) or np.may_share_memory(
        arr, tensor.data
    ):
        arr = arr.copy()  # float files: the data itself, read-only; blocks: already a new array
    return torch.from_numpy(arr)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves of q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# the float tensors of a layer: short name → GGUF name within ``blk.N.``
NORMS = {"attn_norm": "attn_norm.weight", "ffn_norm": "ffn_norm.weight"}
LINEARS = {
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
BIASES = {"q_b": "attn_q.bias", "k_b": "attn_k.bias", "v_b": "attn_v.bias"}


def read_raw(
    reader: Any,
    cfg: ModelConfig,
    *,
    linears: bool = True,
    others: bool = True,
    on_tensor: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The dequantised tensors in transformers' layout, q/k rows unpermuted: ``embed``,
    ``norm``, ``lm_head`` (None when tied) and ``layers``, an iterator that reads each
    layer when it is reached (so a consumer holds one layer's raw tensors at a time):
    the entries of `NORMS`, `LINEARS` and (with attention biases) `BIASES`. ``linears``
    False leaves out the linear weights (``lm_head`` among them), ``others`` False all
    the rest; ``on_tensor`` is called after each tensor read."""
    by_name = tensors(reader)

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in by_name:
            if required:
                raise ModelFormatError(f"GGUF file lacks tensor {name}")
            return None
        t = dequantize(by_name[name])
        if on_tensor is not None:
            on_tensor()
        return t

    wanted = {}
    if others:
        wanted.update(NORMS)
    if linears:
        wanted.update(LINEARS)
    if others and cfg.attention_bias:
        wanted.update(BIASES)

    def layers() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(cfg.num_layers):
            layer = {key: get(f"blk.{i}.{name}") for key, name in wanted.items()}
            if linears and cfg.permuted_qk_in_gguf:
                layer["q"] = unpermute(layer["q"], cfg.num_heads)
                layer["k"] = unpermute(layer["k"], cfg.num_kv_heads)
            yield layer

    raw: dict[str, Any] = {}
    if others:
        raw["embed"] = get("token_embd.weight")
        raw["norm"] = get("output_norm.weight")
    if linears:
        raw["lm_head"] = get("output.weight", required=False)
    raw["layers"] = layers()
    return raw
