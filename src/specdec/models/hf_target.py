"""A `Target` over any `transformers` causal LM, for architectures the native runtime lacks.

`HFTarget` wraps an ``AutoModelForCausalLM`` (batch size one, eval mode, no
grad) and a ``DynamicCache`` and offers the same five operations as
`NativeTarget`: ``forward`` (new tokens with explicit positions and an
optional tree mask), ``rollback``, ``keep``, ``reset``, ``length`` /
``max_length``. The engine and the speculation methods cannot tell the two
apart, except that this one is slower.

Written against transformers 5.x (checked with 5.24):
- the model's forward takes the cache as ``cache=`` (``past_key_values=``
  before 5.x; both are handled) and the positions as ``position_ids``;
- a 4-D ``attention_mask`` of shape (batch, 1, new, past + new) is passed to
  the attention functions as is (``masking_utils._preprocess_mask_arguments``);
  an *additive* float mask (0 visible, dtype-min hidden) is what both the
  ``sdpa`` and the ``eager`` implementations add to the scores, so that is
  what tree passes build. ``flash_attention_*`` and ``flex_attention`` do not
  take such masks: tree passes refuse them (chain passes work);
- ``DynamicCache.layers[i].keys/values`` are (batch, kv_heads, seq, head_dim)
  tensors grown by concatenation; ``DynamicCache.crop(-n)`` drops the last
  ``n`` tokens (a positive argument raises in 5.x).

Limitations: tree masks and ``keep`` need every cache layer to be a plain
full-attention ``DynamicLayer`` (no sliding-window, linear-attention or
shared-KV layers); and a model whose positional scheme depends on the slot
index rather than ``position_ids`` (ALiBi: bloom, mpt) gives wrong tree
logits, since tree nodes at one depth share a position but not a slot.
"""

from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.errors import (
    InvalidRequestError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from specdec.models.catalog import KNOWN_MODELS, resolve_model_file
from specdec.models.loading import check_device, converted_folder, download_from_hub, parse_dtype
from specdec.models.tokenizer import Tokenizer

# Attention implementations that add a 4-D float mask to the scores as given.
_MASKABLE = ("sdpa", "eager")


@dataclass(frozen=True)
class HFTargetConfig:
    """The few numbers of a `transformers` model that callers of a `Target` read.

    Deliberately not `specdec.models.config.ModelConfig`, which describes (and
    only accepts) the native runtime's architectures. ``vocab_size`` is the
    width of the logits; ``max_position_embeddings`` the context length.
    """

    architecture: str  # the config's model_type, e.g. "gpt2"
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    hidden_size: int


@dataclass
class HFModelInfo:
    """What `load_hf_target` loaded, besides the target itself."""

    name: str
    source: Path
    config: HFTargetConfig
    tokenizer: Tokenizer | None
    weight_bytes: int


def _first_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def target_config(model: Any) -> HFTargetConfig:
    """Read an `HFTargetConfig` off a `transformers` model (its text decoder's config)."""
    cfg = model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    vocab = _first_int(text, "vocab_size")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        vocab = int(head.weight.shape[0])  # what the logits really are
    if vocab is None:
        raise ModelFormatError("cannot tell the vocabulary size of the model")
    return HFTargetConfig(
        architecture=str(
            getattr(text, "model_type", None) or getattr(cfg, "model_type", "unknown")
        ),
        vocab_size=vocab,
        # Not every config names its context length alike; 4096 as ModelConfig's default.
        max_position_embeddings=_first_int(
            text,
            "max_position_embeddings",
            "n_positions",
            "max_sequence_length",
            "seq_length",
            "n_ctx",
        )
        or 4096,
        num_layers=_first_int(text, "num_hidden_layers", "n_layer", "num_layers") or 0,
        hidden_size=_first_int(text, "hidden_size", "n_embd", "d_model") or 0,
    )


class HFTarget:
    """A `transformers` causal LM and its ``DynamicCache`` for one sequence.

    ``tokenizer``: a `Tokenizer`, a folder to read one from, or None; kept as
    ``self.tokenizer`` for whoever builds the engine (the target never uses it).
    """

    def __init__(self, model: Any, tokenizer: Tokenizer | str | Path | None = None) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.config = target_config(model)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self.cache = self._new_cache()
        self._fresh_start = 0  # first slot written by the latest pass
        self._fresh_count = 0  # how many slots that pass wrote

    # -- the Target interface ------------------------------------------------
    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def reset(self) -> None:
        self.cache = self._new_cache()
        self._fresh_start = self._fresh_count = 0

    @torch.inference_mode()
    def forward(
        self,
        tokens: list[int],
        positions: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_rows: slice | list[int] | None = None,
    ) -> torch.Tensor:
        """Run ``tokens`` on top of the cache; logits (rows, vocab) for ``logits_rows``.

        ``attn_mask`` (n, m) bool over the last m slots (the n new tokens are the
        last n): token i sees slot j where it is True; older slots are visible.
        None: causal.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        past = self.length
        if past + n > self.max_length:
            raise InvalidRequestError(
                f"sequence of {past + n} tokens exceeds the context of {self.max_length}"
            )
        dev = self.device
        if positions is None:
            positions = range(past, past + n)
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=dev).unsqueeze(0)
        pos = torch.as_tensor(list(positions), dtype=torch.long, device=dev).unsqueeze(0)
        if pos.shape[1] != n:
            raise ValueError(f"{n} tokens but {pos.shape[1]} positions")
        kwargs: dict[str, Any] = {
            self._cache_kw: self.cache,
            "use_cache": True,
            "position_ids": pos,
        }
        if attn_mask is not None:
            kwargs["attention_mask"] = self._tree_mask(attn_mask, past, n)
        rows = _row_indices(logits_rows, n)
        if self._logits_to_keep and rows is not None:
            if rows and rows == list(range(n - len(rows), n)):
                kwargs["logits_to_keep"] = len(rows)  # a suffix: the common case
            else:
                kwargs["logits_to_keep"] = torch.tensor(rows, dtype=torch.long, device=dev)
            rows = None
        out = self.model(input_ids=ids, **kwargs)
        self._fresh_start, self._fresh_count = past, n
        logits = out.logits[0]
        if rows is not None:
            logits = logits[rows]
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return logits

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` slots."""
        length = self.length
        if not 0 <= n <= length:
            raise ValueError(f"cannot roll back {n} of {length} slots")
        if n:
            self.cache.crop(-n)  # transformers 5.x: a negative argument drops that many
        length -= n
        fresh_end = min(self._fresh_start + self._fresh_count, length)
        self._fresh_start = min(self._fresh_start, length)
        self._fresh_count = fresh_end - self._fresh_start

    @torch.inference_mode()
    def keep(self, indices: list[int]) -> None:
        """Keep the given slots of the latest pass (0-based within that pass, increasing), in order."""
        idx = [int(i) for i in indices]
        m = len(idx)
        if m and (
            idx[0] < 0
            or idx[-1] >= self._fresh_count
            or any(b <= a for a, b in itertools.pairwise(idx))
        ):
            raise ValueError(
                f"keep indices must be increasing and within the last {self._fresh_count}"
            )
        start = self._fresh_start
        if idx == list(range(m)):
            if self._fresh_count > m:
                self.cache.crop(-(self._fresh_count - m))
        else:
            self._check_plain_layers("keep")
            for layer in self.cache.layers:
                if not layer.is_initialized:
                    continue
                src = torch.tensor(idx, dtype=torch.long, device=layer.keys.device) + start
                layer.keys = torch.cat(
                    [layer.keys[..., :start, :], layer.keys.index_select(-2, src)], dim=-2
                )
                layer.values = torch.cat(
                    [layer.values[..., :start, :], layer.values.index_select(-2, src)], dim=-2
                )
        self._fresh_count = m

    # -- helpers ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _new_cache(self) -> Any:
        from transformers import DynamicCache  # heavy: imported with a model, see load_hf_target

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()

    def _check_plain_layers(self, what: str) -> None:
        from transformers.cache_utils import DynamicLayer  # see _new_cache

        odd = {
            type(layer).__name__
            for layer in getattr(self.cache, "layers", [None])
            if type(layer) is not DynamicLayer
        }
        if odd:
            raise UnsupportedModelError(
                f"{what} needs full-attention cache layers; this model has {', '.join(sorted(odd))}"
            )

    def _tree_mask(self, tree: torch.Tensor, past: int, n: int) -> torch.Tensor:
        """The (1, 1, n, past + n) additive mask: ``tree`` over the last m slots, older ones visible."""
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if impl not in _MASKABLE:
            raise UnsupportedModelError(
                f"tree attention needs attn_implementation 'sdpa' or 'eager', not {impl!r}"
            )
        self._check_plain_layers("tree attention")
        if tree.dim() != 2 or tree.shape[0] != n or not n <= tree.shape[1] <= past + n:
            raise ValueError(
                f"attn_mask must be ({n}, m) with {n} <= m <= {past + n}, got {tuple(tree.shape)}"
            )
        dtype, dev = self.dtype, self.device
        visible = torch.ones(n, past + n, dtype=torch.bool, device=dev)
        visible[:, past + n - tree.shape[1] :] = tree.to(device=dev, dtype=torch.bool)
        mask = torch.zeros(n, past + n, dtype=dtype, device=dev)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None]


def _row_indices(rows: slice | list[int] | None, n: int) -> list[int] | None:
    """``logits_rows`` as non-negative indices into the n new tokens; None for all of them."""
    if rows is None:
        return None
    if isinstance(rows, slice):
        return list(range(n)[rows])
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    return [range(n)[int(i)] for i in rows]


def load_hf_target(
    folder_or_id: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    device: str = "cpu",
    progress: bool = False,
) -> tuple[HFTarget, HFModelInfo]:
    """Load a safetensors model with ``AutoModelForCausalLM`` from a folder (or a hub id,
    whose json, safetensors and tokenizer files are downloaded first).

    The tokenizer is read from the same folder when it has a ``tokenizer.json``.
    Failures become `ModelNotFoundError` (nothing there) or `ModelFormatError`
    (there, but transformers cannot load it), each with a one-line message.
    """
    torch_dtype = parse_dtype(dtype)
    dev = check_device(device)
    name = str(folder_or_id)
    path = Path(folder_or_id).expanduser()
    if name in KNOWN_MODELS or name.lower().endswith(".gguf"):
        return _load_hf_gguf(
            Path(resolve_model_file(name, progress=progress)), name, torch_dtype, dev, progress
        )
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelNotFoundError(f"{name}: no such folder")
        path = download_from_hub(name)  # a hub id: json, safetensors and tokenizer files
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: not a folder (the transformers backend loads folders)")
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path}: no config.json in this folder")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{path}: no .safetensors files (other formats are not loaded: unsafe)"
        )
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path / 'config.json'}: not valid JSON ({_one_line(e)})") from None

    import transformers  # heavy (seconds): imported when a model is loaded, not with the module

    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=True, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, KeyError, safetensors errors...
        raise ModelFormatError(
            f"cannot load {name} with transformers ({type(e).__name__}: {_one_line(e)})"
        ) from None
    model.to(dev)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").exists() else None
    target = HFTarget(model, tokenizer)
    seen, weight_bytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.nbytes
    return target, HFModelInfo(name, path, target.config, tokenizer, weight_bytes)


def _load_hf_gguf(
    path: Path, name: str, dtype: torch.dtype, device: torch.device, progress: bool
) -> tuple[HFTarget, HFModelInfo]:
    """A GGUF through transformers' own GGUF loader; the tokenizer as the native runtime reads it."""
    import transformers  # see load_hf_target

    tokenizer = Tokenizer(converted_folder(path, progress=progress))
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds here
        raise ModelFormatError(
            f"cannot load {name} with transformers ({type(e).__name__}: {_one_line(e)})"
        ) from None
    model.to(device)
    target = HFTarget(model, tokenizer)
    weight_bytes = sum(p.nbytes for p in {p.data_ptr(): p for p in model.parameters()}.values())
    return target, HFModelInfo(name, path, target.config, tokenizer, weight_bytes)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
