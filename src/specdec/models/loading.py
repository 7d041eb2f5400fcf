"""Load a model (weights, config, tokenizer) from GGUF, a safetensors folder or a hub.

GGUF files are converted once into a folder of the runtime's own layout
(float32 safetensors, config, tokenizer files) under the cache directory; later
loads memory-map that folder instead of dequantising again. The linears' float
weights are dequantised only when a load first needs them (not for ``--quant
gguf``, whose linears are the file's own blocks, packed once beside them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specdec.errors import (
    ModelFormatError,
    ModelNotFoundError,
    RegistryUnreachableError,
    UnsupportedModelError,
)
from specdec.models import gguf_file
from specdec.models.catalog import cache_dir, resolve_model_file
from specdec.models.config import ModelConfig
from specdec.models.cpu_linear import pack_linears, packing_available, step_weight_bytes
from specdec.models.progress import Progress, Stage
from specdec.models.quant_linear import (
    attach_native_layers,
    check_quant,
    linear_names,
    load_packed,
    pack_float_model,
    pack_gguf_model,
    quantise_linears,
    resolve_quant,
    save_packed,
)
from specdec.models.tokenizer import Tokenizer
from specdec.models.transformer import Transformer

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"  # float32: embedding, norms, biases (older folders: all)
LINEARS = "linears.safetensors"  # float32 linears, dequantised on first need (`_FloatWeights`)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
FORMAT_VERSION = 1  # bump when the converted layout changes


@dataclass
class LoadedModel:
    name: str
    source: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    quant: str = "none"  # what the linears hold (`specdec.models.quant_linear.QUANTS`)

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step reads (the embedding table, only indexed, excluded)."""
        return step_weight_bytes(self.model)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_dtype(
    dtype: str | torch.dtype, quant: str = "none", device: str = "cpu"
) -> str | torch.dtype:
    """``auto``: float32 around quantised linears (the kernel computes in float32);
    beside float linears bfloat16 where the device computes it (a GPU; a CPU whose oneDNN
    runs bfloat16 matmuls), float32 elsewhere: on an AVX2-only CPU bfloat16 matmuls are
    emulated, so a pass over k tokens costs about k one-token passes and no draft can pay
    (the 1.5B on such a 2-core machine: 190 ms for 1 token and 660 ms for 4 in bfloat16,
    246 ms and 424 ms in float32). ``quant`` is the resolved one, not ``auto``."""
    if dtype == "auto":
        if quant != "none":
            return "float32"
        if str(device).startswith("cpu") and not cpu_computes_bfloat16():
            return "float32"
        return "bfloat16"
    return dtype


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU's oneDNN runs bfloat16 matmuls (AVX-512 or AVX-NE-CONVERT)."""
    from specdec.models.cpu_linear import _prepacking_works

    return torch.backends.mkldnn.is_available() and _prepacking_works(torch.bfloat16)


def load_model(
    spec: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    progress: bool = True,
    auto_pull: bool = True,
    quant: str = "none",
    pack: bool = True,
) -> LoadedModel:
    """Load what a user named: a known model name, a trained draft's name, a GGUF file, a
    safetensors folder or a hub id.

    ``quant`` (`specdec.models.quant_linear.QUANTS`) swaps the linears for the
    quantised kernel's; ``dtype`` is then the dtype of everything else. ``pack`` False
    keeps float linears as plain ``nn.Linear``s (to train them), not oneDNN-packed."""
    check_quant(quant)
    dev = check_device(device)
    where = resolve_model_file(str(spec), auto_pull=auto_pull, progress=progress)
    if isinstance(where, str):
        where = download_from_hub(where)
    folder = None
    if where.is_dir():
        if (where / "specdec.json").exists():
            folder = where
        elif not (where / "config.json").exists():
            raise ModelNotFoundError(f"{where}: no config.json or specdec.json in this folder")
    else:
        folder = converted_folder(where, progress=progress)
    gguf = None if where.is_dir() else where
    quant = "none" if quant == "auto" and dev.type != "cpu" else resolve_quant(quant, gguf, folder)
    if quant != "none" and dev.type != "cpu":
        raise UnsupportedModelError(f"--quant {quant} runs on the CPU only; use --quant none")
    torch_dtype = parse_dtype(resolve_dtype(dtype, quant, device))
    if folder is None:
        return _load_hf_folder(where, str(spec), torch_dtype, dev, quant, pack)
    return _load_converted(folder, str(spec), torch_dtype, dev, progress, quant, gguf, pack)


def load_tokenizer(spec: str | Path, *, progress: bool = True) -> Tokenizer:
    """The tokenizer of a model, without loading its weights (converting a GGUF once)."""
    where = resolve_model_file(str(spec), auto_pull=True, progress=progress)
    if isinstance(where, str):
        where = download_from_hub(where)
    folder = where if where.is_dir() else converted_folder(where, progress=progress)
    if not (folder / "tokenizer.json").exists():
        raise ModelNotFoundError(f"{folder}: no tokenizer.json")
    return Tokenizer(folder)


def check_device(device: str) -> torch.device:
    """The torch device of a ``--device`` value (cpu, cuda, cuda:N), refused with
    `UnsupportedModelError` when unknown or when CUDA is asked for but absent."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise UnsupportedModelError(f"unknown device {device!r} (cpu or cuda)")
    return torch.device(device)


# --------------------------------------------------------------------------- weights layout
def _fuse(cfg: ModelConfig, raw: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Raw per-layer tensors (transformers' layout) → the runtime's state dict; a raw dict
    without the linears (or without the rest) gives a state dict without them."""
    out = {}
    if "embed" in raw:
        out["embed.weight"] = raw["embed"].to(dtype)
        out["norm.weight"] = raw["norm"].to(dtype)
    if raw.get("lm_head") is not None:
        out["lm_head.weight"] = raw["lm_head"].to(dtype)
    for i, layer in enumerate(raw["layers"]):
        p = f"layers.{i}."
        if "attn_norm" in layer:
            out[p + "attn_norm.weight"] = layer["attn_norm"].to(dtype)
            out[p + "ffn_norm.weight"] = layer["ffn_norm"].to(dtype)
        if "q" in layer:
            wqkv = torch.cat([layer["q"], layer["k"], layer["v"]])
            out[p + "attn.wqkv.weight"] = wqkv.to(dtype)
        if cfg.attention_bias and "q_b" in layer:
            wqkv_b = torch.cat([layer["q_b"], layer["k_b"], layer["v_b"]])
            out[p + "attn.wqkv.bias"] = wqkv_b.to(dtype)
        if "o" in layer:
            out[p + "attn.wo.weight"] = layer["o"].to(dtype)
            out[p + "ffn.w13.weight"] = torch.cat([layer["gate"], layer["up"]]).to(dtype)
            out[p + "ffn.w2.weight"] = layer["down"].to(dtype)
    return out


def _linear_keys(cfg: ModelConfig) -> list[str]:
    """The state-dict keys of the linears' float weights (a tied head has none)."""
    names = linear_names(cfg.num_layers)
    return [f"{n}.weight" for n in names if n != "lm_head" or not cfg.tie_word_embeddings]


def _build(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    device: torch.device,
    packed: dict[str, list] | None = None,
    pack: bool = True,
) -> Transformer:
    """The model from its state dict; ``packed`` (module name → packed parts) replaces
    those linears by quantised ones, whose float weights ``state`` may then lack."""
    tied = cfg.tie_word_embeddings if packed is not None else "lm_head.weight" not in state
    if tied != cfg.tie_word_embeddings:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "tie_word_embeddings": tied})
    with torch.device("meta"):
        model = Transformer(cfg)
    if tied:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    replaced = {f"{name}.weight" for name in packed or ()}
    missing = [k for k in missing if k not in replaced]
    if missing or unexpected:
        raise ModelFormatError(
            f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if tied:
        model.lm_head.weight = model.embed.weight
    if packed is not None:
        quantise_linears(model, packed.get)
    model.to(device)
    if packed is not None:
        attach_native_layers(model)
    model.requires_grad_(False)
    if pack and packing_available(model.dtype, device):
        pack_linears(model)
    return model


# --------------------------------------------------------------------------- GGUF
def converted_folder(gguf_path: Path, *, progress: bool = True) -> Path:
    """The runtime-layout folder of a GGUF file, converting it on first use."""
    gguf_path = Path(gguf_path)
    gguf_file.check_file(gguf_path)
    key = gguf_file.content_key(gguf_path)
    folder = cache_dir() / "converted" / f"{gguf_path.stem}-{key}"
    if (folder / "specdec.json").exists():
        return folder
    log.info("converting %s once into %s", gguf_path, folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mkdir(folder.parent)))
    try:
        _convert_gguf(gguf_path, tmp, progress)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _convert_gguf(path: Path, out: Path, progress: bool) -> None:
    report = Progress(progress)
    what = f"convert {path.name}"
    start = time.perf_counter()
    with report.stage(f"{what}: read the header") as stage:
        reader = gguf_file.open_gguf(path)
        cfg = gguf_file.read_config(reader, path)
        stage.detail = f"{len(reader.tensors)} tensors, {cfg.num_layers} layers"
    with report.stage(f"{what}: weights") as stage:
        # Stored in float32 once; each load casts to the dtype asked for. Not the linears:
        # quantised loads never read their float weights (`_FloatWeights`).
        state = _fuse(cfg, gguf_file.read_raw(reader, cfg, linears=False), torch.float32)
        save_file(state, str(out / WEIGHTS))
        stage.size = (out / WEIGHTS).stat().st_size
        stage.detail = f"{len(state)} float32 tensors (all but the linears) into {WEIGHTS}"
    with report.stage(f"{what}: tokenizer") as stage:
        _save_gguf_tokenizer(path, out)
        stage.size = sum(f.stat().st_size for f in out.iterdir() if f.name != WEIGHTS)
    info = {
        "format_version": FORMAT_VERSION,
        "source": str(path),
        "source_key": gguf_file.content_key(path),
        "config": cfg.to_dict(),
    }
    (out / "specdec.json").write_text(json.dumps(info, indent=1))
    if report.lines:
        total = sum(f.stat().st_size for f in out.iterdir())
        report.line(what, Stage(total, "total"), time.perf_counter() - start)


def _save_gguf_tokenizer(path: Path, out: Path) -> None:
    """Convert the GGUF's tokenizer exactly as transformers does, and keep its files."""
    import transformers  # heavy (seconds to import), and only conversions need it

    transformers.logging.set_verbosity_error()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelFormatError(
            f"{path}: cannot read the tokenizer ({type(e).__name__}: {e})"
        ) from None
    tok.save_pretrained(str(out))


def _load_converted(
    folder: Path,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
    quant: str = "none",
    gguf: Path | None = None,
    pack: bool = True,
) -> LoadedModel:
    """A converted folder's model; ``gguf`` is the file it was converted from as this load
    names it (else the path recorded at conversion, perhaps relative to another directory):
    where packing and the float linears read from."""
    info = json.loads((folder / "specdec.json").read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{folder}: converted with another specdec version; delete the folder"
        )
    cfg = ModelConfig.from_dict(info["config"])
    source = Path(info["source"])
    file = source if gguf is None else gguf
    with _FloatWeights(folder, file, info, cfg, Progress(progress)) as weights:
        packed = None
        if quant != "none":
            packed = _packed_for(folder, file, cfg, quant, weights.get, progress)
        skip = {f"{n}.weight" for n in packed or ()}
        # One tensor at a time, so the float32 file never sits in memory beside its cast.
        state = {k: weights.get(k).to(dtype) for k in weights.keys() if k not in skip}
    return LoadedModel(
        name, source, cfg, _build(cfg, state, device, packed, pack), Tokenizer(folder), quant
    )


class _FloatWeights:
    """The float32 tensors of a converted folder by state-dict key: `WEIGHTS` holds all but
    the linears' weights, `LINEARS` those, dequantised from the GGUF file the first time a
    load asks for one (``--quant none``, or int8/int4 before their packed cache exists);
    ``--quant gguf`` never does. (Folders converted before this split hold everything in
    `WEIGHTS`.) A context manager: the files are open inside it."""

    def __init__(
        self, folder: Path, gguf: Path, info: dict[str, Any], cfg: ModelConfig, report: Progress
    ) -> None:
        self.folder, self.gguf, self.info, self.cfg, self.report = folder, gguf, info, cfg, report
        self._stack = contextlib.ExitStack()
        self._weights = self._stack.enter_context(safe_open(str(folder / WEIGHTS), "pt"))
        self._in_weights = set(self._weights.keys())
        self._linears: Any = None

    def __enter__(self) -> _FloatWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        rest = [k for k in _linear_keys(self.cfg) if k not in self._in_weights]
        return [*self._weights.keys(), *rest]

    def get(self, key: str) -> torch.Tensor:
        if key in self._in_weights:
            return self._weights.get_tensor(key)
        if self._linears is None:
            path = self.folder / LINEARS
            if not path.exists():
                _write_linears(path, self.gguf, self.info.get("source_key"), self.cfg, self.report)
            self._linears = self._stack.enter_context(safe_open(str(path), "pt"))
        return self._linears.get_tensor(key)


def _write_linears(
    path: Path, source: Path, key: str | None, cfg: ModelConfig, report: Progress
) -> None:
    """Dequantise the linears of GGUF file ``source`` (content key ``key``, as converted)
    into ``path``, once."""
    if not source.exists():
        raise ModelNotFoundError(
            f"{source} is gone, and the float weights of its linears are read from it on "
            "first use (--quant none, int8, int4); restore it"
        )
    if gguf_file.content_key(source) != key:
        raise ModelNotFoundError(
            f"{source} has changed since it was converted into {path.parent}; "
            "delete that folder to convert the new file"
        )
    log.info("dequantising the linears of %s once into %s", source, path)
    with report.stage(f"convert {source.name}: linears") as stage:
        reader = gguf_file.open_gguf(source)
        count = cfg.num_layers * len(gguf_file.LINEARS) + (not cfg.tie_word_embeddings)
        bar = report.bar(total=count, desc="converting weights (once)", unit="tensor", leave=False)
        raw = gguf_file.read_raw(reader, cfg, others=False, on_tensor=lambda: bar.update(1))
        state = _fuse(cfg, raw, torch.float32)
        bar.close()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        stage.size = path.stat().st_size
        stage.detail = f"{len(state)} float32 matrices into {path.name}"


def _packed_for(
    folder: Path, source: Path, cfg: ModelConfig, quant: str, tensor: Any, progress: bool
) -> dict[str, list]:
    """Packed linears of a converted GGUF model, built once and cached in its folder."""
    cache = folder / f"packed-{quant}.safetensors"
    packed = load_packed(cache, quant)
    if packed is None:
        if quant == "gguf" and not source.exists():
            raise ModelNotFoundError(
                f"--quant gguf reads the GGUF file's blocks, but {source} is gone; "
                "restore it or use --quant int8/int4"
            )
        log.info("packing the linears for --quant %s once into %s", quant, cache)
        report = Progress(progress)
        with report.stage(f"pack {source.name} for --quant {quant}") as stage:
            packed = pack_gguf_model(source, cfg, quant, tensor, report)
            save_packed(cache, packed, quant)
            stage.size = cache.stat().st_size
            stage.detail = f"{len(packed)} matrices into {cache.name}"
    return packed


# --------------------------------------------------------------------------- safetensors folders
def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(
            f"{folder}: no .safetensors files (other formats are not loaded: unsafe)"
        )
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                yield key, st.get_tensor(key)


def _load_hf_folder(
    folder: Path,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    quant: str = "none",
    pack: bool = True,
) -> LoadedModel:
    cfg = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    w = {k.removeprefix("model."): v for k, v in _iter_safetensors(folder)}

    def take(key: str) -> torch.Tensor:
        if key not in w:
            raise ModelFormatError(f"{folder}: missing weight {key}")
        return w[key]  # no float32 detour: float64 files keep their precision

    raw: dict[str, Any] = {
        "embed": take("embed_tokens.weight"),
        "norm": take("norm.weight"),
        "lm_head": None,
        "layers": [],
    }
    if not cfg.tie_word_embeddings:
        raw["lm_head"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layer = {
            "attn_norm": take(p + "input_layernorm.weight"),
            "ffn_norm": take(p + "post_attention_layernorm.weight"),
            **{x: take(f"{p}self_attn.{x}_proj.weight") for x in "qkvo"},
            **{x: take(f"{p}mlp.{x}_proj.weight") for x in ("gate", "up", "down")},
        }
        if cfg.attention_bias:
            layer.update({f"{x}_b": take(f"{p}self_attn.{x}_proj.bias") for x in "qkv"})
        raw["layers"].append(layer)
    if quant == "gguf":
        raise UnsupportedModelError(f"{folder}: --quant gguf needs a GGUF model; try int8 or int4")
    packed = None
    if quant != "none":  # quantised at each load: only GGUF conversions are cached
        packed = pack_float_model(_fuse(cfg, raw, torch.float32), cfg, quant)
    state = _fuse(cfg, raw, dtype)
    return LoadedModel(
        name, folder, cfg, _build(cfg, state, device, packed, pack), Tokenizer(folder), quant
    )


def download_from_hub(repo_id: str) -> Path:
    """The local folder of hub model ``repo_id`` (its json, safetensors and tokenizer files,
    downloaded once by huggingface_hub); `RegistryUnreachableError` when that fails."""
    try:  # heavy (HTTP stack), and only hub ids need it
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RegistryUnreachableError(
            "huggingface_hub is not installed; cannot load hub ids"
        ) from None
    try:
        path = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RegistryUnreachableError(
            f"cannot fetch {repo_id!r} from the model hub: {msg}"
        ) from None
    return Path(path)
