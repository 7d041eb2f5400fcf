"""Hydra (Ankner et al. 2024): Medusa's static tree, drafted by heads that each read the
tokens drafted before them.

The heads (`specdec.models.hydra_heads`, Hydra++: an extra decoder layer over the
target's states, the prefix, then one MLP per depth) see the committed sequence through
the prefix layer, whose cache holds every committed position: each step the rows just
committed run through it once. The tree is Medusa's (`specdec.speculation.drafters.
medusa`): the best-first paths by product of each head's held-out accuracy per rank,
sized on the pass-cost curve with the measured guessing cost. It is drafted depth by
depth: head k runs once over the tree's nodes at depth k (those with children), each
row reading the prefix state at the last committed position beside the embeddings of the
pending token and its path, and the children are its likeliest tokens at the ranks the
tree asks for.

Drafts are deterministic, so every lossless verifier takes them; ``acceptance=typical``
is Medusa's lossy typical acceptance under sampling, as for ``medusa``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from specdec.models.hydra_heads import HydraHeads
from specdec.models.transformer import Transformer, head_logits
from specdec.speculation.drafters.base import DraftState
from specdec.speculation.drafters.medusa import MedusaDrafter, MedusaOptions, int8_linears
from specdec.speculation.options import option, optional_str
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.typical import TypicalVerifier


@dataclass(frozen=True)
class HydraOptions(MedusaOptions):
    method: ClassVar[str] = "hydra"
    heads: str | None = option(
        None,
        "the heads' folder; default: the one `specdec train hydra --model MODEL` made",
        parse=optional_str,
    )


class HydraDrafter(MedusaDrafter):
    name = "hydra"
    description = (
        "Hydra++ heads (an extra decoder layer on the target's hidden states, then per "
        "depth an MLP that reads the tokens drafted before it; trained here with `specdec "
        "train hydra`) draft Medusa's static tree (Ankner et al. 2024)"
    )
    Options = HydraOptions
    heads_class = HydraHeads

    def __init__(
        self,
        heads: HydraHeads,
        target: Transformer,
        *,
        top_k: int = 8,
        max_nodes: int = 64,
        pass_cost=None,
        quant: str = "none",
        typical: TypicalVerifier | None = None,
    ) -> None:
        heads.check_target(target)
        dtype = target.dtype
        self.heads = heads.to(dtype).requires_grad_(False)
        cfg = heads.config.layer
        # the prefix layer as a one-layer model with a cache of its own (its "LM head" of
        # one row is never asked for logits)
        prefix = Transformer(replace(cfg, vocab_size=1, tie_word_embeddings=False)).to(dtype)
        prefix.config = cfg
        prefix.layers = torch.nn.ModuleList([self.heads.prefix])
        prefix.norm = self.heads.prefix_norm
        if quant == "int8":
            from specdec.models.quant_linear import (
                attach_native_layers,
                float_parts,
                quantise_linears,
            )

            quantise_linears(
                prefix,
                lambda name: (
                    None
                    if name == "lm_head"
                    else float_parts(prefix.get_submodule(name).weight.float(), "int8")
                ),
            )
            attach_native_layers(prefix)
            int8_linears(self.heads, skip="prefix")  # the prefix layer's are quantised above
        self.prefix = prefix
        self.cache = prefix.new_cache(capacity=256)
        self.plan(heads, target, top_k, max_nodes, pass_cost, typical)
        self.state: torch.Tensor | None = None  # the prefix state at the last committed row
        self.pending: list[torch.Tensor] = []

    # ------------------------------------------------------------------ a request
    def reset(self, prompt_ids: list[int]) -> None:
        self.cache.reset()
        self.state = None
        self.pending: list[torch.Tensor] = []  # committed rows not yet through the prefix

    def observe_features(self, hidden: torch.Tensor) -> None:
        if hidden.shape[0]:  # a copy: the caller's buffer may be reused
            self.pending.append(hidden.to(self.target.dtype, copy=True))
        if self.size > 0:  # a tree sized to nothing guesses nothing: the layer waits
            self._catch_up()

    @torch.inference_mode()
    def _catch_up(self) -> None:
        """The committed rows not yet run through the prefix layer, run (once each)."""
        if not self.pending:
            return
        x = torch.cat(self.pending)
        self.pending = []
        n = x.shape[0]
        start = self.cache.length
        positions = torch.arange(start, start + n)
        _, h = self.prefix(
            positions,  # unused: the rows are given
            positions,
            self.cache,
            return_hidden=True,
            logits_rows=slice(0, 0),
            embeds=x,
        )
        self.state = self.prefix.norm(h[-1:])

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), d): what the heads read for drafted tokens (the target's embeddings)."""
        return self.target.embed(torch.tensor(ids))

    @torch.inference_mode()
    def propose(self, state: DraftState) -> DraftTree:
        n = min(self.size, len(self.paths))
        depth = min(self.heads.num_heads, state.budget - 1)
        if n:
            self._catch_up()
        if self.state is None or n == 0 or depth < 1:
            self._tree, self._nodes = DraftTree(), []
            return self._tree
        t = time.perf_counter()
        chosen = self.chosen_paths(n, depth, state.budget)
        # per path its carry: what the next depth's head reads besides the prefix state
        token = {(): state.tokens[-1]}
        e0 = self.embed_tokens([state.tokens[-1]])
        carry = {(): torch.cat([self.heads.root_memo(self.state), e0])}
        for k in range(max((len(self.paths[p]) for p in chosen), default=0)):
            parents = sorted({self.paths[p][:-1] for p in chosen if len(self.paths[p]) == k + 1})
            h, memo = self.heads.depth(k, self.state, torch.stack([carry[q] for q in parents]))
            logits = head_logits(self.target.lm_head, h.to(self.target.dtype), self.rows)
            width = 1 + max(self.paths[p][-1] for p in chosen if len(self.paths[p]) == k + 1)
            top = self.rows[logits.float().topk(width, dim=-1).indices]
            at = {q: i for i, q in enumerate(parents)}
            grown = [p for p in chosen if len(self.paths[p]) == k + 1]
            for p in grown:
                path = self.paths[p]
                token[path] = int(top[at[path[:-1]], path[-1]])
            deeper = [self.paths[p] for p in grown if len(self.paths[p]) < depth]
            if deeper:
                embeds = self.embed_tokens([token[path] for path in deeper])
                for path, e in zip(deeper, embeds, strict=True):
                    carry[path] = torch.cat([memo[at[path[:-1]]], e[None]])
        return self.drafted(chosen, token, t)
