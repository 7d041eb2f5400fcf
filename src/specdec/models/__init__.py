"""The native runtime: config, weights, tokenizer, transformer, KV cache."""

from specdec.models.config import ModelConfig
from specdec.models.kv_cache import KVCache
from specdec.models.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
