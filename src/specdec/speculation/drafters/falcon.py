"""Falcon (Gao et al. 2025): Medusa's static tree, drafted ``k`` depths per pass by a
semi-autoregressive decoder layer on the target's features.

The drafter (`specdec.models.falcon_heads`) keeps the keys and values of every committed
slot (each reads the target's own feature, so they never change): each step the slots
up to the pending token's add theirs. Pass 1 runs the last committed block (the pending
token's slot and the k - 1 before it) and guesses depths 1 .. k at once; pass m runs,
batched, one block per tree node at depth (m - 1) k that has children, its path's last
k tokens beside the features its parent block predicted, each block seeing the
committed slots, its ancestors' blocks and itself, and guesses depths (m - 1) k + 1 ..
m k. The tree is Medusa's (`specdec.speculation.drafters.medusa`: the best-first paths
by product of each depth's held-out accuracy per rank, sized on the pass-cost curve with
the measured guessing cost), so a pass serves k depths of it.

Drafts are deterministic, so every lossless verifier takes them; ``acceptance=typical``
is Medusa's lossy typical acceptance under sampling, as for ``medusa``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.models.falcon_heads import FalconHeads
from specdec.models.transformer import Transformer, head_logits
from specdec.speculation.drafters.base import DraftState
from specdec.speculation.drafters.medusa import MedusaDrafter, MedusaOptions
from specdec.speculation.options import option, optional_str
from specdec.speculation.tree import DraftTree


@dataclass(frozen=True)
class FalconOptions(MedusaOptions):
    method: ClassVar[str] = "falcon"
    heads: str | None = option(
        None,
        "the drafter's folder; default: the one `specdec train falcon --model MODEL` made",
        parse=optional_str,
    )


class FalconDrafter(MedusaDrafter):
    name = "falcon"
    description = (
        "a Falcon drafter (one decoder layer on the model's hidden states with a relaxed "
        "block-causal mask: k tokens per pass, semi-autoregressive; trained here with "
        "`specdec train falcon`) drafts Medusa's static tree, a pass per k depths (Gao et "
        "al. 2025)"
    )
    Options = FalconOptions
    heads_class = FalconHeads

    def __init__(self, heads: FalconHeads, target: Transformer, **kw) -> None:
        super().__init__(heads, target, **kw)
        self.reset([])

    # ------------------------------------------------------------------ a request
    def reset(self, prompt_ids: list[int]) -> None:
        a = self.heads.layer.attn
        dtype = self.target.dtype
        shape = (a.n_kv, 0, a.head_dim)
        self.keys, self.values = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        self.normed = torch.empty(0, self.target.config.hidden_size, dtype=dtype)

    @torch.inference_mode()
    def observe_features(self, hidden: torch.Tensor) -> None:
        if hidden.shape[0]:
            h = self.target.norm(hidden.to(self.target.dtype))
            self.normed = torch.cat([self.normed, h])

    def _slots(self, tokens: list[int], start: int, stop: int) -> torch.Tensor:
        """Slot rows ``start .. stop - 1`` of the committed text."""
        e = self.target.embed(torch.tensor(tokens[start:stop]))
        before = self.normed[max(0, start - 1) : stop - 1]
        if start == 0:
            before = torch.cat([before.new_zeros(1, before.shape[1]), before])
        return self.heads.inputs(e.to(self.heads.dtype), before.to(self.heads.dtype))

    @torch.inference_mode()
    def propose(self, state: DraftState) -> DraftTree:
        n = min(self.size, len(self.paths))
        depth = min(self.heads.num_heads, state.budget - 1)
        tokens, k = state.tokens, self.heads.block
        end = len(tokens)  # slots 0 .. end - 1 are committed, the last the pending token's
        if self.normed.shape[0] < end - 1 or end < k or n == 0 or depth < 1:
            self._tree, self._nodes = DraftTree(), []
            return self._tree
        t = time.perf_counter()
        chosen = self.chosen_paths(n, depth, state.budget)
        cached = self.keys.shape[1]
        if cached < end:  # the committed slots' keys and values, once each
            x = self._slots(tokens, cached, end)
            _, kk, vv = self.heads.project(x, torch.arange(cached, end))
            self.keys = torch.cat([self.keys, kk.to(self.keys.dtype)], dim=1)
            self.values = torch.cat([self.values, vv.to(self.values.dtype)], dim=1)
        keys, values = self.keys[:, :end], self.values[:, :end]
        token: dict[tuple, int] = {}
        out: dict[tuple, torch.Tensor] = {}  # a block's anchor path -> its k predicted features
        blocks: list[tuple[tuple, torch.Tensor, torch.Tensor]] = []  # passes >= 2
        most = max((len(self.paths[p]) for p in chosen), default=0)
        for m in range(1, math.ceil(most / k) + 1):
            lo = (m - 1) * k  # this pass guesses depths lo + 1 .. lo + k
            grown = [p for p in chosen if lo < len(self.paths[p]) <= lo + k]
            anchors = sorted({self.paths[p][:lo] for p in grown})
            if m == 1:
                x = self._slots(tokens, end - k, end)
                q, _, _ = self.heads.project(x, torch.arange(end - k, end))
                visible = torch.ones(k, end, dtype=torch.bool)
                out[()] = self.heads.attend(x, q, keys, values, visible)
            else:
                self._pass(anchors, lo, end, token, out, blocks, keys, values)
            need = max(len(self.paths[p]) for p in grown) - lo
            rows = torch.stack([out[a][:need] for a in anchors])  # (anchors, need, d)
            logits = head_logits(self.target.lm_head, rows.to(self.target.dtype), self.rows)
            width = 1 + max(self.paths[p][-1] for p in grown)
            top = self.rows[logits.float().topk(width, dim=-1).indices]
            at = {a: i for i, a in enumerate(anchors)}
            for p in grown:
                path = self.paths[p]
                token[path] = int(top[at[path[:lo]], len(path) - lo - 1, path[-1]])
        return self.drafted(chosen, token, t)

    def _pass(self, anchors, lo, end, token, out, blocks, keys, values) -> None:
        """One block per anchor (a path of ``lo`` tokens): its last k tokens beside the
        features its parent block predicted, over the committed slots, its ancestors'
        blocks and itself; the predicted features go to ``out``, the keys to ``blocks``."""
        k = self.heads.block
        ids = [token[a[: lo - k + j + 1]] for a in anchors for j in range(k)]
        feats = torch.cat([out[a[: lo - k]] for a in anchors])
        x = self.heads.inputs(self.target.embed(torch.tensor(ids)).to(feats.dtype), feats)
        positions = torch.arange(end + lo - k, end + lo).repeat(len(anchors))
        q, kk, vv = self.heads.project(x, positions)
        owner = [a for a in anchors for _ in range(k)]
        visible = [torch.ones(len(owner), end, dtype=torch.bool)]
        for anchor, _, _ in blocks:  # an ancestor's block: its anchor a proper prefix
            seen = [anchor == a[: len(anchor)] for a in owner]
            visible.append(torch.tensor(seen)[:, None].expand(-1, k))
        mine = torch.tensor([[a == b for b in owner] for a in owner])
        visible.append(mine)
        h = self.heads.attend(
            x,
            q,
            torch.cat([keys.to(x.dtype), *(b[1] for b in blocks), kk], dim=1),
            torch.cat([values.to(x.dtype), *(b[2] for b in blocks), vv], dim=1),
            torch.cat(visible, dim=1),
        )
        for i, a in enumerate(anchors):
            out[a] = h[i * k : (i + 1) * k]
            blocks.append((a, kk[:, i * k : (i + 1) * k], vv[:, i * k : (i + 1) * k]))
