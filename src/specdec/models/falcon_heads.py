"""Falcon (Gao et al. 2025): a semi-autoregressive drafter that guesses ``k`` tokens per
pass, on the target's own features.

Slot ``s`` of the drafter's sequence reads ``fc([embed(t_s), f_{s-1}])``: the token at
``s`` beside the target's feature after the token before it (its last hidden state after
its final norm, zeros before the first token), as EAGLE-1's head does. One decoder layer
of the target's shape runs over the slots with Falcon's **relaxed causal mask**: the
slots come in blocks of ``k``, and a slot sees every slot of its own block and of the
blocks before it. Slot ``s`` predicts the feature ``k - 1`` places on, ``f_{s+k-1}``,
which the target's frozen LM head turns into the logits of token ``s + k``. So the last
block of the committed text (slots ``L - k .. L - 1``, the last the pending token's)
guesses the next ``k`` tokens in one pass, each from its own top-k (semi-autoregressive:
a block's tokens do not read each other's guesses).

Drafting deeper runs one more pass per ``k`` depths: a node at depth ``m k`` of the tree
starts a block of its path's last ``k`` tokens beside the features its parent block
predicted for them; the block sees the committed slots, the blocks of its ancestors and
itself (Falcon's tree attention), and guesses depths ``m k + 1 .. m k + k``. The keys
and values of committed slots never change (each reads the target's own feature), so
they are computed once per slot.

Deviations from Falcon, said again in docs/BENCHMARKS.md: ``fc`` (2·hidden → hidden, as
EAGLE-1) stands in for the paper's two-layer LSTM (the authors' public code has the LSTM
wired so that it cannot run, and an LSTM is sequential on a CPU); the layer keeps its
input norm; the logits cover a draft vocabulary of frequent tokens through the target's
frozen LM head; the tree is Medusa's static tree chosen from each depth's measured
accuracy per rank (the authors' trees are hand-made path lists).

A drafter lives in a folder as the other heads do: ``config.json`` (`FalconConfig`, kind
"falcon", ``num_heads`` the drafting depths, ``block`` = k) and ``head.safetensors``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models.eagle_head import HeadError, draft_vocab_ids
from specdec.models.medusa_heads import HeadSet, LayerHeadsConfig, init_random
from specdec.models.transformer import Block, RotaryTable, Transformer, _rotate_half


@dataclass(kw_only=True)
class FalconConfig(LayerHeadsConfig):
    """Medusa's fields (num_heads: drafting depths; num_layers: unused, 1), the decoder
    layer's shape and the block size ``block`` (k: tokens guessed per pass)."""

    kind: ClassVar[str] = "falcon"
    label: ClassVar[str] = "Falcon"
    block: int = 2  # the paper's best k

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block < 1:
            raise HeadError(f"a Falcon drafter's block must be >= 1, got {self.block}")

    def extra_json(self) -> dict[str, Any]:
        return {**super().extra_json(), "block": self.block}

    @classmethod
    def extra_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super().extra_fields(data), "block": int(data["block"])}


def block_mask(n: int, block: int, phase: int = 0) -> torch.Tensor:
    """The relaxed causal mask over ``n`` slots (True: may attend): slot s is in block
    ``(s + phase) // block`` and sees every slot of its block and of those before it."""
    ids = (torch.arange(n) + phase) // block
    return ids[None, :] <= ids[:, None]


class FalconHeads(HeadSet):
    config_class = FalconConfig

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.config = config
        c = config.layer
        d = c.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.layer = Block(c)
        self.rotary: RotaryTable | None = None
        for p in self.parameters():
            p.requires_grad_(True)
        self.register_buffer("d2t", torch.arange(config.draft_vocab, dtype=torch.long))

    @property
    def block(self) -> int:
        return self.config.block

    @property
    def dtype(self) -> torch.dtype:
        """The drafter's compute dtype (a norm's: linears may be int8 `QuantLinear`s)."""
        return self.layer.attn_norm.weight.dtype

    # ------------------------------------------------------------ the drafter's arithmetic
    def inputs(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Slot rows from token embeddings and the features before them (rows, d)."""
        return self.fc(torch.cat([embeds, features], dim=-1).to(self.dtype))

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (heads, rows, hd), keys and values (kv_heads, rows, hd) of slot rows
        ``x`` at ``positions``, rotated."""
        attn = self.layer.attn
        n = x.shape[0]
        qkv = attn.wqkv(self.layer.attn_norm(x))
        heads = qkv.view(n, attn.n_heads + 2 * attn.n_kv, attn.head_dim).transpose(0, 1)
        qk, v = heads.split([attn.n_heads + attn.n_kv, attn.n_kv])
        if self.rotary is None:
            self.rotary = RotaryTable(self.config.layer, x.device)
        cos, sin = self.rotary.lookup(positions, x.dtype)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk.split([attn.n_heads, attn.n_kv])
        return q, k, v

    def attend(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """The layer's output for slot rows ``x`` with queries ``q``, over ``keys`` and
        ``values`` (kv_heads, N, hd; the rows' own among them) where ``visible`` (rows, N)
        is True: the predicted features (rows, d), in the target's normed feature space."""
        attn = self.layer.attn
        o = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=visible, enable_gqa=True
        )[0]
        h = x + attn.wo(o.transpose(0, 1).reshape(x.shape[0], attn.n_heads * attn.head_dim))
        return h + self.layer.ffn(self.layer.ffn_norm(h))

    @classmethod
    def for_target(
        cls,
        target: Transformer,
        name: str,
        num_heads: int = 4,
        num_layers: int = 1,
        draft_tokens: torch.Tensor | None = None,
        seed: int = 0,
        block: int = 2,
    ) -> FalconHeads:
        """A new drafter for ``target`` (called ``name``) drafting ``num_heads`` depths,
        ``block`` per pass, among ``draft_tokens`` (target ids; None: all): random (std
        0.02, biases zero, norms one, as EAGLE's and Falcon's layers start)."""
        c = target.config
        vocab = draft_vocab_ids(c.vocab_size, draft_tokens)
        config = FalconConfig.for_target(target, name, num_heads, num_layers, vocab, block=block)
        heads = cls(config)
        init_random(heads.named_parameters(), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            heads.d2t.copy_(vocab)
        return heads.to(torch.float32)


def slot_rows(
    heads: FalconHeads, target: Transformer, tokens: torch.Tensor, normed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's token embedding and the feature before it (zeros at slot 0), from a
    sequence's ``tokens`` (n,) and the target's normed features ``normed`` (n, d)."""
    with torch.no_grad():
        embeds = target.embed(tokens).to(heads.dtype)
    before = torch.cat([normed.new_zeros(1, normed.shape[1]), normed[:-1]])
    return embeds, before.to(heads.dtype)


def sequence_outputs(
    heads: FalconHeads, embeds: torch.Tensor, before: torch.Tensor, phase: int = 0
) -> torch.Tensor:
    """Training's pass over one sequence's slots (`slot_rows`, maybe glanced) under the
    relaxed causal mask with blocks starting at ``-phase``: slot s's predicted feature
    ``f_{s+k-1}`` (n, d)."""
    n = embeds.shape[0]
    x = heads.inputs(embeds, before)
    q, k, v = heads.project(x, torch.arange(n))
    return heads.attend(x, q, k, v, block_mask(n, heads.block, phase))


def drafting_outputs(
    heads: FalconHeads, target: Transformer, tokens: torch.Tensor, normed: torch.Tensor
) -> list[torch.Tensor]:
    """What drafting computes after every committed prefix of one sequence, the path
    teacher-forced (the tokens drafting would have taken had every guess been right): for
    each depth r (from 0), the predicted features (n - k + 1 - r, d) at the prefixes
    whose pending token is at c = k - 1 .. n - 1 - r; their logits guess token c + r + 1.
    Pass 1 is the block of slots c - k + 1 .. c over the committed slots; pass m the
    block of slots c + (m - 2) k + 1 .. c + (m - 1) k (the path's tokens beside pass
    m - 1's predicted features), over the committed slots up to c and the earlier
    passes' blocks of the same prefix."""
    k = heads.block
    n = tokens.shape[0]
    embeds, before = slot_rows(heads, target, tokens, normed)
    x = heads.inputs(embeds, before)
    q, keys, values = heads.project(x, torch.arange(n))
    rows = torch.arange(n)
    ends = torch.arange(k - 1, n)  # the pending token's slot c of each prefix
    first = []  # pass 1, by role r: slot c - k + 1 + r, seeing the slots up to c
    for r in range(k):
        h = heads.attend(x, q, keys, values, rows[None, :] <= rows[:, None] + (k - 1 - r))
        first.append(h[ends - k + 1 + r])
    outs = list(first)
    cols = torch.arange(n)
    past_k, past_v, past_end = [], [], []  # earlier passes' blocks, one row per (c, r)
    for m in range(2, math.ceil(heads.num_heads / k) + 1):
        feats = torch.stack(outs[-k:], dim=1)  # (prefixes, k, d): pass m - 1's
        slot = ends[:, None] + (m - 2) * k + 1 + torch.arange(k)[None]  # (prefixes, k)
        ids = tokens[slot.clamp(max=n - 1)]  # past the end: any token (never scored)
        with torch.no_grad():
            e = target.embed(ids.flatten()).to(heads.dtype)
        xm = heads.inputs(e, feats.flatten(0, 1))
        qm, km, vm = heads.project(xm, slot.flatten())
        end = ends.repeat_interleave(k)  # each row's prefix end
        visible = [cols[None, :] <= end[:, None]]
        visible += [end[:, None] == e_[None, :] for e_ in [*past_end, end]]
        h = heads.attend(
            xm,
            qm,
            torch.cat([keys, *past_k, km], dim=1),
            torch.cat([values, *past_v, vm], dim=1),
            torch.cat(visible, dim=1),
        ).view(len(ends), k, -1)
        past_k, past_v, past_end = [*past_k, km], [*past_v, vm], [*past_end, end]
        outs += [h[:, r] for r in range(k)]
    return [outs[r][: len(ends) - r] for r in range(min(heads.num_heads, len(ends)))]
