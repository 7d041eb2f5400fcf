"""Clover heads (Xiao et al. 2024, Clover-1): Medusa's heads made regressive through a
chain of states, over an augmenting block.

The Augmenting Block is one decoder layer of the target's shape over the target's last
hidden states (before its final norm), attending over every committed position; its
output at the last committed position is the chain's first state ``s_0``. Depth i (from
1) has an Attention Decoder that folds in the token drafted before it (for depth 1, the
pending token the target chose):

    s_i = s_{i-1} + AD_i(RMSNorm(s_{i-1}), e(x_{i-1}))

with one key and one value, from the token, per attention head: the head's query on
the state times its key on the token gives a gate, ``SiLU(q·k / sqrt(head_dim))``, on its
value. Then head i's MLP, residual blocks ``x + SiLU(W x + b)``, reads the normed state
and its output goes through the target's own LM head at the draft vocabulary's rows to
guess the token at depth i. ``e(x)`` is the LM head's row of x scaled to unit RMS (the
paper's token vectors: rows of the LM head, normalised), zero for a token outside the
draft vocabulary. So each guess depends on the path before it, as a draft model's
would, while a step costs one pass of the augmenting block over the rows just committed
and, per depth, three d×d products and an MLP over the tree's nodes at that depth.

Initialisation (the paper's): W_Q and W_K the identity plus noise (std 0.01), W_V zero,
the MLPs' W zero, so untrained heads each read ``RMSNorm(s_0)`` through the target's
final norm: the target's own distribution when the augmenting block passes its input.

Deviations from Clover-1, said again in docs/BENCHMARKS.md: the augmenting block starts
random (std 0.02; its residual makes it near the identity) instead of as a copy of the
target's last layer, whose float weights the quantised runtime does not keep; the heads
share the target's frozen LM head at a draft vocabulary (as the paper's do), with the
token vectors of tokens outside it zero; the loss is ours (Medusa's, distillation
towards the target's distribution, weighted 0.8^i: the paper gives none); a static tree
from the heads' measured accuracies (Medusa's) instead of the paper's dynamic 4-node one.

A head set lives in a folder as the other heads do: ``config.json`` (`CloverConfig`,
kind "clover") and ``head.safetensors``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models.eagle_head import (
    draft_vocab_ids,
)
from specdec.models.hydra_heads import causal_block
from specdec.models.medusa_heads import HeadSet, LayerHeadsConfig, ResBlock, init_random
from specdec.models.transformer import Block, RMSNorm, Transformer


class CloverConfig(LayerHeadsConfig):
    """Medusa's fields (num_layers: residual blocks per head's MLP) and the augmenting
    block's shape."""

    kind: ClassVar[str] = "clover"
    label: ClassVar[str] = "Clover"


class AttentionDecoder(nn.Module):
    """``s + gate * V e`` per attention head, the gate ``SiLU(q·k / sqrt(head_dim))`` of the
    head's query on ``RMSNorm(s)`` and key on the token vector ``e``."""

    def __init__(self, d: int, n_heads: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm = RMSNorm(d, eps)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)

    def forward(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        rows, d = s.shape
        hd = d // self.n_heads
        q = self.wq(self.norm(s)).view(rows, self.n_heads, hd)
        k = self.wk(e).view(rows, self.n_heads, hd)
        v = self.wv(e).view(rows, self.n_heads, hd)
        gate = F.silu((q * k).sum(-1, keepdim=True) / math.sqrt(hd))
        return s + (gate * v).reshape(rows, d)


class CloverHeads(HeadSet):
    config_class = CloverConfig

    def __init__(self, config: CloverConfig) -> None:
        super().__init__()
        self.config = config
        c = config.layer
        d = c.hidden_size
        self.prefix = Block(c)  # the augmenting block
        self.prefix_norm = nn.Identity()  # the chain starts from its residual stream
        self.decoders = nn.ModuleList(
            AttentionDecoder(d, c.num_heads, c.rms_norm_eps) for _ in range(config.num_heads)
        )
        self.out_norm = RMSNorm(d, c.rms_norm_eps)
        self.mlps = nn.ModuleList(
            nn.Sequential(*(ResBlock(d) for _ in range(config.num_layers)))
            for _ in range(config.num_heads)
        )
        for p in self.parameters():
            p.requires_grad_(True)
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    # ------------------------------------------------------------ the heads' arithmetic
    def prefix_states(self, target: Transformer, last: torch.Tensor) -> torch.Tensor:
        """The augmenting block over one whole sequence, causally, with autograd
        (training): ``last`` (rows, d) the target's last-layer states (before its final
        norm); the chain's first states."""
        x = last.to(self.out_norm.weight.dtype)
        return causal_block(self.prefix, x, self.config.layer)

    def step(self, k: int, s: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth k + 1 from states ``s`` (rows, d) and the token vectors ``e`` (rows, d) of
        the tokens before it: head k's output (rows, d), to go through the LM head's rows,
        and the next states."""
        s = self.decoders[k](s, e.to(s.dtype))
        return self.mlps[k](self.out_norm(s)), s

    # ------------------------------------------------------------ drafting, depth by depth
    def root_memo(self, state: torch.Tensor) -> torch.Tensor:
        """What the root's carry holds before the pending token's vector: the chain's
        first state (a carry is a state and the vector of the token after it)."""
        return state

    def depth(
        self, k: int, state: torch.Tensor, carries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head k over the tree's nodes at depth k (``carries``: (rows, 2, d), each node's
        state and its token's vector): its outputs (rows, d) and each node's next state
        (rows, 1, d), which its children carry beside their own token's vector."""
        out, s = self.step(k, carries[:, 0], carries[:, 1])
        return out, s[:, None]

    @staticmethod
    def token_vectors(weight: torch.Tensor) -> torch.Tensor:
        """The draft vocabulary's token vectors from the LM head's rows at it: each row
        scaled to unit RMS."""
        w = weight.float()
        return w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-12)

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        num_heads: int = 4,
        num_layers: int = 1,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CloverHeads:
        """New heads for ``target`` (called ``name``), drafting among ``draft_tokens``
        (target ids; None: all): the augmenting block random (std 0.02, biases zero,
        norms one); each decoder's W_Q, W_K the identity plus noise (std 0.01), W_V zero;
        the output norm the target's final norm; the MLPs the identity."""
        c = target.config
        vocab = draft_vocab_ids(c.vocab_size, draft_tokens)
        heads = cls(CloverConfig.for_target(target, name, num_heads, num_layers, vocab))
        d = c.hidden_size
        g = torch.Generator().manual_seed(seed)
        init_random(heads.prefix.named_parameters(), g)
        with torch.no_grad():
            for dec in heads.decoders:
                dec.norm.weight.fill_(1.0)
                for lin in (dec.wq, dec.wk):
                    lin.weight.copy_(torch.eye(d) + torch.randn(d, d, generator=g) * 0.01)
                dec.wv.weight.zero_()
            heads.out_norm.weight.copy_(target.norm.weight.float())
            for mlp in heads.mlps:
                for p in mlp.parameters():
                    p.zero_()
            heads.d2t.copy_(vocab)
        return heads.to(torch.float32)
