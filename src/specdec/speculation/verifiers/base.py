"""The verifier interface: accept a path through the draft tree, add one token of the target's."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.speculation.sampling import SamplingParams
from specdec.speculation.tree import DraftTree


@dataclass
class Outcome:
    """Accepted nodes (indices into the tree, root to leaf) and the target's own next token.

    ``bonus`` is either the *bonus* token (every drafted token on the path was
    accepted and the target adds one more) or the *recovered* token (sampled
    from the residual distribution after a rejection).
    """

    path: list[int] = field(default_factory=list)
    bonus: int = -1
    # the target's logits of the pass (row 0 after the root, row i + 1 after node i), for
    # drafters that learn from them (Token Recycling); set by the engine
    logits: torch.Tensor | None = None
    # its hidden states (last layer, before the final norm; rows as ``logits``), when the
    # drafter reads them (`Drafter.feature_layers`); set by the engine
    hidden: torch.Tensor | None = None

    def tokens(self, tree: DraftTree) -> list[int]:
        return [tree.tokens[i] for i in self.path] + [self.bonus]


class Verifier:
    """``verify(tree, p, params, rng)``: ``p`` holds the target's distribution after the
    root (row 0) and after each node ``i`` (row ``i + 1``), already shaped by
    ``params`` (temperature / top-k / top-p) with `specdec.speculation.sampling.probabilities`."""

    name: str = ""
    lossless: bool = True

    def verify(
        self,
        tree: DraftTree,
        p: torch.Tensor,
        params: SamplingParams,
        rng: torch.Generator | None,
    ) -> Outcome:
        raise NotImplementedError


def check_rows(tree: DraftTree, p: torch.Tensor) -> None:
    """``p`` must have a row for the root and one for each node."""
    if p.shape[0] != len(tree) + 1:
        raise ValueError(f"p has {p.shape[0]} rows, expected {len(tree) + 1} ([root] + nodes)")
