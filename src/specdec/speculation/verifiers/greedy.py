"""Greedy tree verification (SpecInfer's VerifyGreedy, Miao et al. 2023).

From the root, follow the child whose token is the target's argmax at the
current node; stop at the first node with no such child and emit that argmax
as the bonus. The committed tokens are exactly what greedy decoding with the
target alone produces.
"""

from __future__ import annotations

import torch

from specdec.errors import InvalidRequestError
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier, check_rows


class GreedyVerifier(Verifier):
    name = "greedy"
    lossless = True

    def verify(
        self,
        tree: DraftTree,
        p: torch.Tensor,
        params: SamplingParams,
        rng: torch.Generator | None,
    ) -> Outcome:
        if not params.greedy:
            raise InvalidRequestError(
                f"the greedy verifier needs temperature 0, got {params.temperature}"
            )
        check_rows(tree, p)
        best = p.argmax(-1).tolist()  # target's token after the root (0) and after node i (i + 1)
        children = tree.children()
        path: list[int] = []
        node = -1
        while True:
            want = best[node + 1]
            # The first child with the wanted token (siblings may repeat a token).
            nxt = next((c for c in children[node] if tree.tokens[c] == want), None)
            if nxt is None:
                return Outcome(path, want)
            path.append(nxt)
            node = nxt
