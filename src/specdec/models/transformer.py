"""The native transformer for the Llama family (llama, mistral, qwen2).

Written for speculation: any number of new tokens per pass, explicit
positions, an optional tree mask over the new tokens, an optional subset of
layers, hidden states out. Linears are plain ``nn.Linear`` modules so that
quantised implementations can be swapped in without this file knowing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import native
from specdec.models.config import ModelConfig
from specdec.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, as transformers does.
        if x.dtype in (torch.bfloat16, torch.float16):
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class RotaryTable:
    """cos/sin of every position up to a growing limit (NeoX half-rotation layout)."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        d = config.head_dim
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
        )
        if config.rope_scaling and config.rope_scaling.get("rope_type") == "llama3":
            inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
        self.inv_freq = inv_freq.to(device)
        self.cos = self.sin = torch.empty(0, d, device=device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        need = int(positions.max()) + 1
        if need > self.cos.shape[0]:
            size = max(need, 2 * self.cos.shape[0], 512)
            t = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_out, bias=config.attention_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (n, d)
        cos: torch.Tensor,  # (n, head_dim)
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        start: int,
        mask: torch.Tensor | None,  # (n, start + n) bool, None: attend to everything
    ) -> torch.Tensor:
        return self.forward_segments(x, cos, sin, [(x.shape[0], cache, start, mask)], layer)

    def forward_segments(
        self,
        x: torch.Tensor,  # (n, d): every segment's rows, in order
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: list[tuple[int, KVCache, int, torch.Tensor | None]],  # rows, cache, start, mask
        layer: int,
    ) -> torch.Tensor:
        """Projections over all rows at once; each segment attends to its own cache."""
        n = x.shape[0]
        qkv = self.wqkv(x)
        heads = qkv.view(n, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(0, 1)
        qk, v = heads.split([self.n_heads + self.n_kv, self.n_kv])  # (H + Hkv, n, D), (Hkv, n, D)
        qk = qk * cos + _rotate_half(qk) * sin  # RoPE on queries and keys in one go
        q, k = qk.split([self.n_heads, self.n_kv])
        outs, r = [], 0
        for rows, cache, start, mask in segments:
            e = r + rows
            outs.append(self._attend(q[:, r:e], k[:, r:e], v[:, r:e], cache, layer, start, mask))
            r = e
        return self.wo(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _attend(self, q, k, v, cache: KVCache, layer: int, start: int, mask) -> torch.Tensor:
        """(n, H*D): queries q (H, n, D) over the cache after writing k, v at ``start``."""
        n = q.shape[1]
        end = start + n
        cache.k[layer, :, start:end] = k
        cache.v[layer, :, start:end] = v
        keys = cache.k[layer, :, :end]  # (Hkv, end, D)
        values = cache.v[layer, :, :end]
        if n <= SMALL_PASS and q.dtype == torch.float32 and _native_attention():
            return native.attend(q.contiguous(), cache.k[layer], cache.v[layer], end, mask)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, enable_gqa=True
        )  # (1, H, n, D)
        return out[0].transpose(0, 1).reshape(n, self.n_heads * self.head_dim)


# Passes of at most this many tokens (a decode step, a verified draft) attend with the
# native kernel in float32: torch's CPU SDPA costs ~100 us a call for one query on two
# cores (1.5B, 300 cached tokens), mostly fixed overhead; the kernel ~10 us.
SMALL_PASS = 16
# A long causal pass through the native layers (a prompt's prefill) runs in chunks of this
# many tokens, each over the cache the earlier ones wrote. Every row's arithmetic is the
# same either way (rows are independent in the kernels; attention sums a row's visible
# keys by rank), so the results are bit for bit those of one pass; but the chunks' int8
# activations stay in cache: measured on the 1.5B Q4_K_M, 700 tokens took 5.42 s in one
# pass, 4.89 s in chunks of 256, 4.01 s of 128, 4.23 s of 64.
PREFILL_CHUNK = 128
_NATIVE: list[bool] = []


def _native_attention() -> bool:
    if not _NATIVE:
        _NATIVE.append(native.available())
    return _NATIVE[0]


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = config.intermediate_size
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = FeedForward(config)


@dataclass
class Segment:
    """One sequence's share of a batched pass (`Transformer.forward_batch`): its new
    tokens, their positions, its cache, an optional tree mask (as `Transformer.forward`'s
    ``attn_mask``) and the rows that need logits (None: all)."""

    tokens: Sequence[int]
    positions: Sequence[int]
    cache: KVCache
    attn_mask: torch.Tensor | None = None
    logits_rows: slice | list[int] | None = None


class Transformer(nn.Module):
    """`forward` runs one sequence (or one tree of them) in its cache; `forward_batch`
    runs several, each in its own."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.requires_grad_(False)
        self._rope: RotaryTable | None = None
        # one native call per layer (float32, quantised linears): see quant_linear
        self.native_layers: list | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, capacity: int = 256, max_capacity: int | None = None) -> KVCache:
        c = self.config
        return KVCache(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            capacity=capacity,
            max_capacity=max_capacity or c.max_position_embeddings,
            dtype=self.dtype,
            device=self.device,
        )

    def rope(self) -> RotaryTable:
        if self._rope is None or self._rope.inv_freq.device != self.device:
            self._rope = RotaryTable(self.config, self.device)
        return self._rope

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (n,) token ids
        positions: torch.Tensor,  # (n,) RoPE positions
        cache: KVCache,
        attn_mask: torch.Tensor | None = None,  # (n, m) bool over the last m slots; None: causal
        layers: Sequence[int] | None = None,
        return_hidden: bool = False,
        logits_rows: torch.Tensor | slice | None = None,
        vocab_rows: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        hidden_layers: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run ``tokens`` through the model, appending them to ``cache``.

        Every new token attends to the tokens that ``attn_mask`` allows among the
        last ``m`` slots (its columns; the n new tokens are the last n; default:
        causal over the new ones) and to every older slot in the cache. ``layers`` runs only those layers (a prefix for early
        exit, a subset for layer skipping); the skipped layers' cache slots for
        these tokens are left stale, to be overwritten by a later full pass.
        ``logits_rows`` selects which rows get logits (the LM head is costly);
        ``vocab_rows`` (increasing token ids) which columns: logits over that subset of
        the vocabulary only, at that fraction of the LM head's cost where the head can be
        restricted (quantised heads, plain linears; otherwise computed whole and indexed).
        ``embeds`` (n, hidden): the rows the layers start from instead of the tokens'
        embeddings (a draft head feeds its own).
        Returns logits (rows, vocab), and with ``return_hidden`` also the last
        run layer's output before the final norm (n, hidden); with ``hidden_layers`` too,
        instead the residual stream entering each of those layers, side by side
        (n, len(hidden_layers) * hidden): id i is the input of layer i, id num_layers the
        last layer's output (the numbering of vLLM's and speculators' EAGLE-3 layer ids).
        """
        n = tokens.shape[0]
        start = cache.begin_write(n)
        mask = attention_mask(attn_mask, start, n, self.device)
        cos, sin = self.rope().lookup(positions, self.dtype)
        h = self.embed(tokens) if embeds is None else embeds.to(self.dtype).clone()  # (n, d)
        order = range(len(self.layers)) if layers is None else layers
        taps = _taps(hidden_layers, order, len(self.layers)) if return_hidden else {}
        tapped = h.new_empty(n, len(hidden_layers), h.shape[1]) if taps else None
        final = [j for j, i in enumerate(hidden_layers or ()) if i == len(self.layers)]
        if self.native_layers is not None and h.dtype == torch.float32:
            h, cos, sin = h.contiguous(), cos.contiguous(), sin.contiguous()
            if attn_mask is None and n > PREFILL_CHUNK:  # causal: in chunks (see above)
                parts = [(s, min(n, s + PREFILL_CHUNK)) for s in range(0, n, PREFILL_CHUNK)]
            else:
                parts = [(0, n)]
            for s, e in parts:
                part = mask if len(parts) == 1 else attention_mask(None, start + s, e - s, h.device)
                part = None if part is None else part.contiguous()
                hs, cs, ss = h[s:e], cos[s:e], sin[s:e]  # row slices: contiguous views
                for i in order:
                    if i in taps:
                        tapped[s:e, taps[i]] = hs
                    self.native_layers[i](hs, cs, ss, cache.k[i], cache.v[i], start + s, part)
        else:
            for i in order:
                if i in taps:
                    tapped[:, taps[i]] = h
                block = self.layers[i]
                h = h + block.attn(block.attn_norm(h), cos, sin, cache, i, start, mask)
                h = h + block.ffn(block.ffn_norm(h))
        rows = h if logits_rows is None else h[logits_rows]
        logits = head_logits(self.lm_head, self.norm(rows), vocab_rows)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        if not return_hidden:
            return logits
        if tapped is None:
            return logits, h
        for j in final:
            tapped[:, j] = h
        return logits, tapped.reshape(n, -1)

    @torch.inference_mode()
    def forward_batch(
        self, segments: Sequence[Segment], hidden_layers: Sequence[int] | None = None
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """Several sequences in one pass, each appending to its own cache: continuous
        batching. The linears (and the LM head) run once over every segment's rows, so
        the weights are read once for the whole batch; attention stays within a segment.
        Each row's arithmetic is what `forward` does for its sequence alone (the native
        kernels are per row), so a sequence's output does not depend on its batch.
        Returns, per segment, what `forward` returns for it (with ``hidden_layers``: its
        logits and the residual stream entering those layers, side by side)."""
        if not segments:
            return []
        dev = self.device
        starts = [seg.cache.begin_write(len(seg.tokens)) for seg in segments]
        sizes = [len(seg.tokens) for seg in segments]
        n = sum(sizes)
        masks = [
            attention_mask(seg.attn_mask, start, size, dev)
            for seg, start, size in zip(segments, starts, sizes, strict=True)
        ]
        tokens = torch.cat([torch.as_tensor(seg.tokens, dtype=torch.long) for seg in segments])
        positions = torch.cat(
            [torch.as_tensor(seg.positions, dtype=torch.long) for seg in segments]
        )
        cos, sin = self.rope().lookup(positions.to(dev), self.dtype)
        h = self.embed(tokens.to(dev))
        order = range(len(self.layers))
        taps = _taps(hidden_layers, order, len(self.layers))
        tapped = h.new_empty(n, len(hidden_layers), h.shape[1]) if taps else None
        native = self.native_layers is not None and h.dtype == torch.float32
        if native:
            h, cos, sin = h.contiguous(), cos.contiguous(), sin.contiguous()
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        for wave in _waves(segments, sizes, native):
            # each piece: segment j's rows s..e, at cache slot starts[j] + s
            rows = torch.cat([torch.arange(offsets[j] + s, offsets[j] + e) for j, s, e in wave])
            whole = len(wave) == len(segments) and all(e - s == sizes[j] for j, s, e in wave)
            hw, cw, sw = (h, cos, sin) if whole else (h[rows], cos[rows], sin[rows])
            pieces = []
            for j, s, e in wave:
                if e - s == sizes[j]:
                    mask = masks[j]
                else:  # a chunk of a causal prompt: causal within, everything before visible
                    mask = attention_mask(None, starts[j] + s, e - s, dev)
                pieces.append((j, e - s, starts[j] + s, mask))
            if native:
                pieces = [
                    (j, m, st, None if k is None else k.contiguous()) for j, m, st, k in pieces
                ]
                for i in order:
                    if i in taps:
                        tapped[rows, taps[i]] = hw
                    parts = [
                        (m, segments[j].cache.k[i], segments[j].cache.v[i], st, k)
                        for j, m, st, k in pieces
                    ]
                    self.native_layers[i].batch(hw, cw, sw, parts)
            else:
                parts = [(m, segments[j].cache, st, k) for j, m, st, k in pieces]
                for i in order:
                    if i in taps:
                        tapped[rows, taps[i]] = hw
                    block = self.layers[i]
                    hw = hw + block.attn.forward_segments(block.attn_norm(hw), cw, sw, parts, i)
                    hw = hw + block.ffn(block.ffn_norm(hw))
            if whole:
                h = hw
            else:
                h[rows] = hw
        picked = [
            torch.arange(offsets[j], offsets[j + 1])[
                seg.logits_rows if seg.logits_rows is not None else slice(None)
            ]
            for j, seg in enumerate(segments)
        ]
        logits = self.lm_head(self.norm(h[torch.cat(picked).to(dev)]))
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        per = list(logits.split([len(p) for p in picked]))
        if hidden_layers is None:
            return per
        if tapped is None:
            hidden = h
        else:
            for j, i in enumerate(hidden_layers):
                if i == len(self.layers):
                    tapped[:, j] = h
            hidden = tapped.reshape(n, -1)
        return [(per[j], hidden[offsets[j] : offsets[j + 1]]) for j in range(len(segments))]


def _waves(segments, sizes: list[int], chunked: bool) -> list[list[tuple[int, int, int]]]:
    """How `Transformer.forward_batch` runs its rows: waves of pieces (segment, first row,
    end row), each wave one pass through the layers. A long causal segment (a prompt) is
    cut into chunks of `PREFILL_CHUNK` rows run in successive waves, at most that many
    chunk rows per wave beside the short segments (which all run in the first): on the
    native kernels this keeps a wave's activations in cache (see `PREFILL_CHUNK`), and
    each row's arithmetic is unchanged, so the results are bit for bit those of one wave."""
    waves: list[list[tuple[int, int, int]]] = [[]]
    room = [PREFILL_CHUNK]
    for j, (seg, n) in enumerate(zip(segments, sizes, strict=True)):
        if not chunked or seg.attn_mask is not None or n <= PREFILL_CHUNK:
            waves[0].append((j, 0, n))
            continue
        w = 0
        for s in range(0, n, PREFILL_CHUNK):
            e = min(n, s + PREFILL_CHUNK)
            while w < len(waves) and room[w] < e - s:
                w += 1
            if w == len(waves):
                waves.append([])
                room.append(PREFILL_CHUNK)
            waves[w].append((j, s, e))
            room[w] -= e - s
            w += 1  # the next chunk attends to this one: a later wave
    return waves


def _taps(ids: Sequence[int] | None, order: Sequence[int], count: int) -> dict[int, int]:
    """Layer id -> column of the hidden states to return, for ids that are a layer's input
    (the last layer's output, id ``count``, is taken after the loop)."""
    if not ids:
        return {}
    run = set(order)
    for i in ids:
        if not (0 <= i <= count and (i == count or i in run)):
            raise ValueError(f"hidden layer {i} is not one of the {count} layers run")
    if len(set(ids)) != len(ids):
        raise ValueError(f"hidden layers repeat: {list(ids)}")
    return {i: j for j, i in enumerate(ids) if i < count}


def head_logits(head: nn.Module, x: torch.Tensor, vocab_rows: torch.Tensor | None) -> torch.Tensor:
    """``head(x)`` at the columns ``vocab_rows`` only (None: all)."""
    if vocab_rows is None:
        return head(x)
    if hasattr(head, "rows"):  # a quantised head restricts its own packed weights
        return head.rows(vocab_rows)(x)
    if isinstance(head, nn.Linear):
        return F.linear(x, head.weight[vocab_rows])
    return head(x)[..., vocab_rows]


def attention_mask(
    tree: torch.Tensor | None, start: int, n: int, device: torch.device
) -> torch.Tensor | None:
    """The (n, start + n) bool mask: ``tree`` covers the last ``m`` slots (the n new ones
    and, when ``m > n``, the ``m - n`` slots before them, e.g. a draft tree's earlier
    levels still in the cache); every older slot is visible."""
    if n == 1 and tree is None:
        return None
    if tree is None:
        tree = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    elif tree.dim() != 2 or tree.shape[0] != n or not n <= tree.shape[1] <= start + n:
        raise ValueError(
            f"attn_mask must be ({n}, m) with {n} <= m <= {start + n}, got {tuple(tree.shape)}"
        )
    tree = tree.to(device=device, dtype=torch.bool)
    older = start + n - tree.shape[1]
    if older == 0:
        return tree
    return torch.cat([torch.ones(n, older, dtype=torch.bool, device=device), tree], dim=1)
