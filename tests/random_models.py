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
        self.size = vocab
        self.eos_token_ids = frozenset({vocab - 1})

    def vocab(self) -> dict[str, int]:
        return {chr(65 + i): i for i in range(self.size)}

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


class ChunkTokenizer:
    """A stand-in tokenizer over byte chunks: greedy longest match, ids in the order given.

    ``pieces`` are strings or bytes (a byte piece may be half a UTF-8 character);
    decoding joins the bytes and replaces incomplete characters with U+FFFD, as
    byte-level BPE tokenizers do. A second toy vocabulary for cross-vocabulary tests.
    """

    def __init__(self, pieces, eos: list[int] | None = None) -> None:
        self.pieces = [p.encode() if isinstance(p, str) else bytes(p) for p in pieces]
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.longest = max(len(p) for p in self.pieces)
        self.eos_token_ids = frozenset(eos or ())
        self.vocab_size = len(self.pieces)

    def encode(self, text, add_special_tokens=True):
        data, ids, i = text.encode(), [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                if (j := self.index.get(data[i : i + n])) is not None:
                    ids.append(j)
                    i += n
                    break
            else:
                raise ValueError(f"no piece for byte {data[i]!r}")
        return ids

    def decode(self, ids, skip_special_tokens=False):
        skip = self.eos_token_ids if skip_special_tokens else ()
        return b"".join(self.pieces[i] for i in ids if i not in skip).decode("utf-8", "replace")

    def stream_decoder(self, skip_special_tokens=True):
        from specdec.models.tokenizer import StreamDecoder

        return StreamDecoder(self, skip_special_tokens)


def chunk_vocabulary(alphabet: str, pairs: int, seed: int = 0) -> list[str]:
    """Every character of ``alphabet`` plus ``pairs`` random two- and three-character chunks,
    shuffled: a vocabulary that splits text differently from one token per character."""
    import random

    rng = random.Random(seed)
    chunks = set(alphabet)
    while len(chunks) < len(set(alphabet)) + pairs:
        chunks.add("".join(rng.choice(alphabet) for _ in range(rng.choice([2, 2, 3]))))
    pieces = sorted(chunks)
    rng.shuffle(pieces)
    return pieces


def remap_vocab(model: Transformer, old_ids: list[int | None], seed: int = 0) -> Transformer:
    """``model`` over another vocabulary: new id ``i`` is old id ``old_ids[i]`` (its embedding
    and output rows), or a new random token where ``old_ids[i]`` is None. With a one-to-one
    map the result predicts exactly what ``model`` does, in the other ids."""
    import dataclasses

    config = dataclasses.replace(model.config, vocab_size=len(old_ids))
    new = Transformer(config).to(model.dtype)
    new.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("embed.", "lm_head."))},
        strict=False,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, old in enumerate(old_ids):
            if old is None:
                new.embed.weight[i] = torch.randn(config.hidden_size, generator=g) * 0.3
                new.lm_head.weight[i] = torch.randn(config.hidden_size, generator=g) * 0.3
            else:
                new.embed.weight[i] = model.embed.weight[old]
                new.lm_head.weight[i] = model.lm_head.weight[old]
    return new


def tree_mask_and_depths(parents: list[int]) -> tuple[torch.Tensor, list[int]]:
    """A token tree given by each node's parent (-1: a root; parents precede children): the
    (n, n) mask of each node's ancestors and itself, and each node's depth."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depths: list[int] = []
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
        depths.append(0 if p < 0 else depths[p] + 1)
    return mask, depths


def path_to(parents: list[int], node: int) -> list[int]:
    """The nodes from the root down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
