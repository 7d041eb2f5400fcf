"""Clover (Xiao et al. 2024): Medusa's static tree, drafted by heads regressive through a
chain of states.

The heads (`specdec.models.clover_heads`, Clover-1: an augmenting block over the target's
states, then per depth an attention decoder that folds the token before it into the
chain's state, and an MLP) are drafted as Hydra's (`specdec.speculation.drafters.hydra`):
the augmenting block's cache holds every committed position, each step the rows just
committed run through it once, and the tree (the best-first paths of the heads' held-out
accuracies per rank, sized on the pass-cost curve) is drafted depth by depth, each node
carrying its chain state and its token's vector to its children.

The token vectors are the target's LM-head rows at the draft vocabulary scaled to unit
RMS, computed once per target and head set (the LM head as the kernel computes it).

Drafts are deterministic, so every lossless verifier takes them; ``acceptance=typical``
is Medusa's lossy typical acceptance under sampling, as for ``medusa``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.models.clover_heads import CloverHeads
from specdec.models.eagle_head import head_rows
from specdec.models.transformer import Transformer
from specdec.speculation.drafters.hydra import HydraDrafter, HydraOptions
from specdec.speculation.options import option, optional_str

# target -> {draft vocabulary's bytes: (vectors, target id -> draft index or -1)}
_VECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CloverOptions(HydraOptions):
    method: ClassVar[str] = "clover"
    heads: str | None = option(
        None,
        "the heads' folder; default: the one `specdec train clover --model MODEL` made",
        parse=optional_str,
    )


class CloverDrafter(HydraDrafter):
    name = "clover"
    description = (
        "Clover heads (an augmenting decoder layer on the target's hidden states, then per "
        "depth an attention decoder that folds the token before it into a chain of states, "
        "and an MLP; trained here with `specdec train clover`) draft Medusa's static tree "
        "(Xiao et al. 2024)"
    )
    Options = CloverOptions
    heads_class = CloverHeads

    def __init__(self, heads: CloverHeads, target: Transformer, **kw) -> None:
        super().__init__(heads, target, **kw)
        self.vectors, self.t2d = token_vectors(target, heads.d2t)

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), d): the tokens' vectors, zero outside the draft vocabulary."""
        at = self.t2d[torch.tensor(ids)]
        out = self.vectors[at.clamp(min=0)]
        return out * (at >= 0)[:, None].to(out.dtype)


def token_vectors(target: Transformer, d2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft vocabulary's token vectors for ``target`` (its dtype) and the map from
    target ids to their rows (-1: outside), made once per target and vocabulary."""
    cache = _VECTORS.setdefault(target, {})
    key = d2t.numpy().tobytes()
    if key not in cache:
        vectors = CloverHeads.token_vectors(head_rows(target, d2t)).to(target.dtype)
        t2d = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
        t2d[d2t] = torch.arange(d2t.numel())
        cache.clear()  # one head set's at a time
        cache[key] = (vectors, t2d)
    return cache[key]
