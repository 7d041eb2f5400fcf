"""Chimera heads (Zeng et al. 2024): a trigram encoder and a full-context decoder over the
target's states, with residual decoding heads.

Drafting the token after position p (the pending token, or a drafted one) reads:
- the **trigram encoder**: the target's embeddings of the tokens at p - 2, p - 1 and p,
  concatenated (3d), through an MLP ``W2 SiLU(W1 x)`` (3d → d → d), the short-range
  context; at the sequence's start the first token stands in for the missing ones;
- the **full-context decoder**: one decoder layer of the target's shape whose query is
  the trigram's output at position p and whose keys and values are the target's last
  hidden states (after its final norm) at every committed position, plus the query's own
  (the long-range context, read through the decoder's own projections: cacheable, one
  row per committed position);
- a **residual head** per depth r: logits of ``A_r h + B_r o`` through the target's own
  LM head at the draft vocabulary, ``h`` the target's normed state at the last committed
  position, ``o`` the decoder's output.

So each guess depends on the path before it through the trigram, while a step costs the
decoder's keys and values for the rows just committed and, per depth, the trigram MLP
and one decoder row per tree node at that depth.

Deviations from Chimera, said again in docs/BENCHMARKS.md: the decoder's query attends to
the target's states and itself, not to the trigram rows of earlier positions (the
authors' layer runs over both); each residual head is ``A_r h + B_r o`` through the
target's frozen LM head at a draft vocabulary (theirs: a trained 2d → V linear started as
[W | W]), A_r starting as the identity and B_r at zero so that untrained heads give the
target's own next-token distribution; the decoder starts random (std 0.02); trained by
distillation towards the target's distribution (theirs: cross-entropy to the data).

A head set lives in a folder as the other heads do: ``config.json`` (`ChimeraConfig`,
kind "chimera") and ``head.safetensors``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from specdec.models.eagle_head import (
    draft_vocab_ids,
)
from specdec.models.medusa_heads import HeadSet, LayerHeadsConfig, init_random
from specdec.models.transformer import Block, RotaryTable, Transformer, _rotate_half


class ChimeraConfig(LayerHeadsConfig):
    """Medusa's fields (num_heads: drafting depths; num_layers: unused, 1) and the
    decoder's shape."""

    kind: ClassVar[str] = "chimera"
    label: ClassVar[str] = "Chimera"


def trigrams(tokens: torch.Tensor) -> torch.Tensor:
    """(n, 3): the tokens at p - 2, p - 1, p for each position p of ``tokens``, the first
    token standing in before the start."""
    n = tokens.shape[0]
    idx = torch.arange(n)[:, None] + torch.arange(-2, 1)[None]
    return tokens[idx.clamp(min=0)]


class ChimeraHeads(HeadSet):
    config_class = ChimeraConfig

    def __init__(self, config: ChimeraConfig) -> None:
        super().__init__()
        self.config = config
        c = config.layer
        d = c.hidden_size
        self.trigram = nn.Sequential(nn.Linear(3 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.decoder = Block(c)
        self.a = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(config.num_heads))
        self.b = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(config.num_heads))
        self.rotary: RotaryTable | None = None
        for p in self.parameters():
            p.requires_grad_(True)
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    @property
    def dtype(self) -> torch.dtype:
        """The heads' compute dtype (a norm's: linears may be int8 `QuantLinear`s)."""
        return self.decoder.attn_norm.weight.dtype

    # ------------------------------------------------------------ the heads' arithmetic
    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` (heads, rows, head_dim) at ``positions``."""
        if self.rotary is None:
            self.rotary = RotaryTable(self.config.layer, x.device)
        cos, sin = self.rotary.lookup(positions, x.dtype)
        return x * cos + _rotate_half(x) * sin

    def keys(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's keys and values (kv_heads, rows, head_dim) of the target's normed
        states ``h`` (rows, d) at ``positions``."""
        attn = self.decoder.attn
        qkv = attn.wqkv(self.decoder.attn_norm(h.to(self.dtype)))
        n = h.shape[0]
        heads = qkv.view(n, attn.n_heads + 2 * attn.n_kv, attn.head_dim).transpose(0, 1)
        _, k, v = heads.split([attn.n_heads, attn.n_kv, attn.n_kv])
        return self._rotate(k, positions), v

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """The trigram encoder on (rows, 3, d) embeddings: (rows, d)."""
        return self.trigram(embeds.flatten(1).to(self.dtype))

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder on query rows ``x`` (rows, d) at ``positions``: each attends to the
        first ``visible[i]`` of the committed ``keys``/``values`` (kv_heads, N, head_dim)
        and to itself. (rows, d)."""
        attn, block = self.decoder.attn, self.decoder
        m = x.shape[0]
        qkv = attn.wqkv(block.attn_norm(x))
        heads = qkv.view(m, attn.n_heads + 2 * attn.n_kv, attn.head_dim).transpose(0, 1)
        q, k, v = heads.split([attn.n_heads, attn.n_kv, attn.n_kv])
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        group = attn.n_heads // attn.n_kv
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scale = 1 / math.sqrt(attn.head_dim)
        shared = torch.einsum("hmd,hnd->hmn", q, keys) * scale  # (heads, rows, N)
        hidden = torch.arange(keys.shape[1], device=x.device)[None] >= visible[:, None]
        shared = shared.masked_fill(hidden[None], float("-inf"))
        own = (q * k).sum(-1, keepdim=True) * scale  # (heads, rows, 1)
        p = torch.cat([shared, own], dim=-1).softmax(-1)
        o = torch.einsum("hmn,hnd->hmd", p[..., :-1], values) + p[..., -1:] * v
        h = x + attn.wo(o.transpose(0, 1).reshape(m, attn.n_heads * attn.head_dim))
        return h + block.ffn(block.ffn_norm(h))

    def head(self, r: int, state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Depth r's residual head (from 0): ``A_r h + B_r o`` (rows, d), to go through
        the LM head's rows."""
        return self.a[r](state.to(out.dtype)) + self.b[r](out)

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        num_heads: int = 4,
        num_layers: int = 1,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
    ) -> ChimeraHeads:
        """New heads for ``target`` (called ``name``), drafting among ``draft_tokens``
        (target ids; None: all): the trigram encoder and the decoder random (std 0.02,
        biases zero, norms one), each head's A the identity and B zero (the target's own
        next-token distribution)."""
        c = target.config
        vocab = draft_vocab_ids(c.vocab_size, draft_tokens)
        heads = cls(ChimeraConfig.for_target(target, name, num_heads, num_layers, vocab))
        g = torch.Generator().manual_seed(seed)
        init_random([*heads.trigram.named_parameters(), *heads.decoder.named_parameters()], g)
        with torch.no_grad():
            for a, b in zip(heads.a, heads.b, strict=True):
                a.weight.copy_(torch.eye(c.hidden_size))
                b.weight.zero_()
            heads.d2t.copy_(vocab)
        return heads.to(torch.float32)


def sequence_outputs(
    heads: ChimeraHeads, target: Transformer, tokens: torch.Tensor, last: torch.Tensor
) -> list[torch.Tensor]:
    """Training's forward over one sequence (``tokens`` (n,), ``last`` (n, d): the target's
    last-layer states before its final norm), teacher-forced: for each depth r (from 0)
    the residual head's outputs (n - r - 1, d) at positions t = 0 .. n - r - 2, the query
    being the trigram ending at token t + r + 1 at that position, reading the target's
    states at 0 .. t; its logits guess token t + r + 2."""
    n = last.shape[0]
    h = target.norm(last.to(heads.dtype))
    keys, values = heads.keys(h, torch.arange(n))
    with torch.no_grad():
        embeds = target.embed(trigrams(tokens))  # (n, 3, d): the trigram ending at each
    outs = []
    for r in range(min(heads.num_heads, n - 1)):
        m = n - r - 1
        at = torch.arange(m) + r + 1  # the query's position: its trigram's last token
        o = heads.decode(heads.encode(embeds[at]), at, keys, values, torch.arange(m) + 1)
        outs.append(heads.head(r, h[:m], o))
    return outs
