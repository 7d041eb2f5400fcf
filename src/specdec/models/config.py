"""Model configuration: the few numbers that define a Llama-family transformer.

Read from GGUF metadata or from a Hugging Face `config.json`; both map onto one
dataclass so the runtime never looks at a file format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from specdec.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # Llama 3 style frequency scaling ({"rope_type": "llama3", ...}) or None.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r} for the native runtime "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
                "load it with --backend hf (the transformers adapter)"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise UnsupportedModelError(f"unsupported rope scaling {kind!r}")

    @property
    def permuted_qk_in_gguf(self) -> bool:
        """llama.cpp's converter interleaves the rotary halves of q/k for llama-type models."""
        return self.architecture in ("llama", "mistral")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """`meta` maps GGUF keys (e.g. ``qwen2.block_count``) to plain Python values."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise UnsupportedModelError("GGUF file has no general.architecture key")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
        vocab = meta.get(f"{arch}.vocab_size") or vocab_size
        if vocab is None:
            raise UnsupportedModelError("cannot tell the vocabulary size from the GGUF file")
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            scaling = {"rope_type": meta[f"{arch}.rope.scaling.type"]}
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
            attention_bias=arch == "qwen2",
            tie_word_embeddings=False,  # decided by the loader: tied iff output.weight is absent
            rope_scaling=scaling,
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} for the native runtime "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
                "load it with --backend hf (the transformers adapter)"
            )
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes rope_parameters = {rope_theta, rope_type, ...}; older, two keys.
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
        )
