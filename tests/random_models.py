"""Small random native models for fast exactness tests (float64)."""

from __future__ import annotations

import torch

from specdec.models.config import ModelConfig
from specdec.models.transformer import Transformer


def random_config(arch: str = "qwen2", vocab: int = 64, layers: int = 3, **kw) -> ModelConfig:
    base = dict(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        attention_bias=arch == "qwen2",
    )
    base.update(kw)
    return ModelConfig(**base)


def random_transformer(
    arch: str = "qwen2", seed: int = 0, dtype=torch.float64, **kw
) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(random_config(arch, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def full_logits(model: Transformer, tokens: list[int], positions: list[int] | None = None):
    """Logits of a fresh causal forward over `tokens`."""
    cache = model.new_cache()
    pos = positions if positions is not None else list(range(len(tokens)))
    return model(torch.tensor(tokens), torch.tensor(pos), cache)


class CharTokenizer:
    """A stand-in tokenizer: id i is the letter chr(65 + i); the last id is EOS."""

    def __init__(self, vocab: int = 64) -> None:
        self.vocab = vocab
        self.eos_token_ids = frozenset({vocab - 1})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(
            chr(65 + i) for i in ids if not (skip_special_tokens and i in self.eos_token_ids)
        )

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 65 for c in text]

    def stream_decoder(self, skip_special_tokens=True):
        from specdec.models.tokenizer import StreamDecoder

        return StreamDecoder(self, skip_special_tokens)


def perturbed_copy(model: Transformer, noise: float, seed: int = 1) -> Transformer:
    """A draft model that agrees with `model` often but not always."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise)
    return draft
