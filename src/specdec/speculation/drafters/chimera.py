"""Chimera (Zeng et al. 2024): Medusa's static tree, drafted depth by depth by a trigram
encoder and a full-context decoder over the target's states, with residual heads.

The heads (`specdec.models.chimera_heads`) keep the decoder's keys and values of the
target's normed states at every committed position: each step the rows just committed
add theirs. The tree is Medusa's (`specdec.speculation.drafters.medusa`: the best-first
paths by product of each head's held-out accuracy per rank, sized on the pass-cost curve
with the measured guessing cost), drafted depth by depth: at depth r every node with
children reads the trigram of its path's last three tokens (the committed ones and the
pending one before them), the decoder's row for it over the committed states, and head
r's residual sum with the target's state at the last committed position; its children
are the likeliest tokens at the ranks the tree asks for.

Drafts are deterministic, so every lossless verifier takes them; ``acceptance=typical``
is Medusa's lossy typical acceptance under sampling, as for ``medusa``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.models.chimera_heads import ChimeraHeads
from specdec.models.transformer import Transformer, head_logits
from specdec.speculation.drafters.base import DraftState
from specdec.speculation.drafters.medusa import MedusaDrafter, MedusaOptions
from specdec.speculation.options import option, optional_str
from specdec.speculation.tree import DraftTree


@dataclass(frozen=True)
class ChimeraOptions(MedusaOptions):
    method: ClassVar[str] = "chimera"
    heads: str | None = option(
        None,
        "the heads' folder; default: the one `specdec train chimera --model MODEL` made",
        parse=optional_str,
    )


class ChimeraDrafter(MedusaDrafter):
    name = "chimera"
    description = (
        "Chimera heads (a trigram encoder of the last tokens and a full-context decoder "
        "over the target's hidden states, with residual heads; trained here with `specdec "
        "train chimera`) draft Medusa's static tree (Zeng et al. 2024)"
    )
    Options = ChimeraOptions
    heads_class = ChimeraHeads

    def __init__(self, heads: ChimeraHeads, target: Transformer, **kw) -> None:
        super().__init__(heads, target, **kw)
        self.reset([])

    # ------------------------------------------------------------------ a request
    def reset(self, prompt_ids: list[int]) -> None:
        a = self.heads.decoder.attn
        shape = (a.n_kv, 0, a.head_dim)
        dtype = self.target.dtype
        self.keys, self.values = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        self.state: torch.Tensor | None = None  # the target's normed last committed state

    @torch.inference_mode()
    def observe_features(self, hidden: torch.Tensor) -> None:
        n = hidden.shape[0]
        if not n:
            return
        h = self.target.norm(hidden.to(self.target.dtype))
        start = self.keys.shape[1]
        k, v = self.heads.keys(h, torch.arange(start, start + n))
        self.keys = torch.cat([self.keys, k], dim=1)
        self.values = torch.cat([self.values, v], dim=1)
        self.state = h[-1:]

    @torch.inference_mode()
    def propose(self, state: DraftState) -> DraftTree:
        n = min(self.size, len(self.paths))
        depth = min(self.heads.num_heads, state.budget - 1)
        if self.state is None or n == 0 or depth < 1:
            self._tree, self._nodes = DraftTree(), []
            return self._tree
        t = time.perf_counter()
        chosen = self.chosen_paths(n, depth, state.budget)
        committed = self.keys.shape[1]  # the pending token's position
        tail = list(state.tokens[-3:])
        tail = [tail[0]] * (3 - len(tail)) + tail
        ids = {(): tail}  # path -> the three tokens its trigram reads
        token = {}
        for r in range(max((len(self.paths[p]) for p in chosen), default=0)):
            grown = [p for p in chosen if len(self.paths[p]) == r + 1]
            parents = sorted({self.paths[p][:-1] for p in grown})
            x = self.heads.encode(self.target.embed(torch.tensor([ids[q] for q in parents])))
            rows = len(parents)
            positions = torch.full((rows,), committed + r)
            visible = torch.full((rows,), committed)
            o = self.heads.decode(x, positions, self.keys, self.values, visible)
            h = self.heads.head(r, self.state.expand(rows, -1), o)
            logits = head_logits(self.target.lm_head, h.to(self.target.dtype), self.rows)
            width = 1 + max(self.paths[p][-1] for p in grown)
            top = self.rows[logits.float().topk(width, dim=-1).indices]
            at = {q: i for i, q in enumerate(parents)}
            for p in grown:
                path = self.paths[p]
                token[path] = int(top[at[path[:-1]], path[-1]])
                ids[path] = [*ids[path[:-1]][1:], token[path]]
        return self.drafted(chosen, token, t)
