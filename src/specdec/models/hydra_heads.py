"""Hydra++ heads (Ankner et al. 2024): Medusa's heads made sequentially dependent, over
an extra decoder layer.

The target's last hidden state at each committed position goes through one decoder
layer of the target's shape (the "prefix" layer, with a norm of its own after it), which
attends over every committed position: the state the heads read, ``p_t``. Head k (from 0) at position t reads ``[p_t, e(x_{t+1}), ..., e(x_{t+k+1})]``:
the prefix state beside the embeddings of the pending token and of the k tokens drafted
after it (the target's own embedding table), and guesses the token after them. So head
k's guess depends on the path it extends, as a draft model's would, while drafting still
costs one pass of the prefix layer per step (over the rows just committed) and, per
depth, one small MLP over the tree's nodes at that depth.

Head k is a residual block whose input is (k + 2) hidden states wide, ``R x + SiLU(W x +
b)`` (R projects the input back to the hidden size, as the authors' wide block does),
then ``num_layers - 1`` blocks ``x + SiLU(W x + b)``; its output goes through the
target's own LM head at the draft vocabulary's rows. W starts at zero (the authors'
initialisation).

Deviations from Hydra++, said again in docs/BENCHMARKS.md: the heads share the target's
frozen LM head at a draft vocabulary (as `specdec.models.medusa_heads`; the authors
train one per head, initialised from the target's); R starts as the identity on the
prefix state and zero on the embeddings; the prefix layer reads the target's residual
stream before its final norm (the authors': after it) and its norm starts as the
target's final norm, so that untrained heads read exactly the target's own normed state
(the authors start R at random); ``num_layers`` defaults to 1 block per head (Hydra++ uses 4) for what a CPU can
train and draft.

A head set lives in a folder as the other heads do: ``config.json`` (`HydraConfig`,
kind "hydra", with each head's held-out accuracy per rank, from which the drafter's
static tree is chosen) and ``head.safetensors``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models.config import ModelConfig
from specdec.models.eagle_head import (
    draft_vocab_ids,
)
from specdec.models.medusa_heads import HeadSet, LayerHeadsConfig, ResBlock, init_random
from specdec.models.transformer import Block, RMSNorm, RotaryTable, Transformer, _rotate_half


class HydraConfig(LayerHeadsConfig):
    """Medusa's fields (num_layers: blocks per head) and the prefix layer's shape."""

    kind: ClassVar[str] = "hydra"
    label: ClassVar[str] = "Hydra"


class WideBlock(nn.Module):
    """``res(x) + SiLU(linear(x))``: a residual block from a wider input."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.res = nn.Linear(d_in, d)
        self.linear = nn.Linear(d_in, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(x) + F.silu(self.linear(x))


class HydraHeads(HeadSet):
    config_class = HydraConfig

    def __init__(self, config: HydraConfig) -> None:
        super().__init__()
        self.config = config
        d = config.layer.hidden_size
        self.prefix = Block(config.layer)
        self.prefix_norm = RMSNorm(d, config.layer.rms_norm_eps)
        self.heads = nn.ModuleList(
            nn.Sequential(
                WideBlock((k + 2) * d, d), *(ResBlock(d) for _ in range(config.num_layers - 1))
            )
            for k in range(config.num_heads)
        )
        for p in self.parameters():
            p.requires_grad_(True)
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    # ------------------------------------------------------------ the heads' arithmetic
    def prefix_states(self, target: Transformer, last: torch.Tensor) -> torch.Tensor:
        """The prefix layer over one whole sequence, causally, with autograd (training):
        ``last`` (rows, d) the target's last-layer states (before its final norm)."""
        x = last.to(self.prefix_norm.weight.dtype)
        return self.prefix_norm(causal_block(self.prefix, x, self.config.layer))

    def head(self, k: int, prefix: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Head k's output (rows, d), to go through the LM head's rows: ``prefix`` (rows,
        d) the prefix states, ``embeds`` (rows, k + 1, d) the embeddings of the pending
        token and the k tokens after it."""
        x = torch.cat([prefix, embeds.flatten(1).to(prefix.dtype)], dim=-1)
        return self.heads[k](x)

    # ------------------------------------------------------------ drafting, depth by depth
    def root_memo(self, state: torch.Tensor) -> torch.Tensor:
        """What the root's carry holds before the pending token's embedding: nothing (a
        carry is the path's embeddings, pending token first)."""
        return state[:0]

    def depth(
        self, k: int, state: torch.Tensor, carries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head k over the tree's nodes at depth k (``carries``: (rows, k + 1, d), their
        paths' embeddings; ``state``: (1, d), the prefix state): its outputs (rows, d),
        and what each node's children carry before their own token's embedding."""
        return self.head(k, state.expand(carries.shape[0], -1), carries), carries

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        num_heads: int = 4,
        num_layers: int = 1,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
    ) -> HydraHeads:
        """New heads for ``target`` (called ``name``), drafting among ``draft_tokens``
        (target ids; None: all): the prefix layer random (std 0.02, biases zero, norms
        one), its norm the target's final norm; each head's wide block reads the prefix
        state alone (R the identity there, W zero), later blocks the identity."""
        c = target.config
        vocab = draft_vocab_ids(c.vocab_size, draft_tokens)
        heads = cls(HydraConfig.for_target(target, name, num_heads, num_layers, vocab))
        d = c.hidden_size
        init_random(heads.prefix.named_parameters(), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            heads.prefix_norm.weight.copy_(target.norm.weight.float())
            for head in heads.heads:
                for p in head.parameters():
                    p.zero_()
                head[0].res.weight[:, :d].copy_(torch.eye(d))
            heads.d2t.copy_(vocab)
        return heads.to(torch.float32)


def causal_block(block: Block, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``block`` (a decoder layer) over the rows of one sequence at positions 0.. n - 1,
    each attending to those before it, with autograd: what `Transformer.forward` computes
    through a cache, for training."""
    n = x.shape[0]
    attn = block.attn
    cos, sin = RotaryTable(config, x.device).lookup(torch.arange(n, device=x.device), x.dtype)
    qkv = attn.wqkv(block.attn_norm(x))
    heads = qkv.view(n, attn.n_heads + 2 * attn.n_kv, attn.head_dim).transpose(0, 1)
    qk, v = heads.split([attn.n_heads + attn.n_kv, attn.n_kv])
    qk = qk * cos + _rotate_half(qk) * sin
    q, k = qk.split([attn.n_heads, attn.n_kv])
    o = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True
    )[0]
    h = x + attn.wo(o.transpose(0, 1).reshape(n, attn.n_heads * attn.head_dim))
    return h + block.ffn(block.ffn_norm(h))
