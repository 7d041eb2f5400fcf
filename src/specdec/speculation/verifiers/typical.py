"""Typical acceptance (Medusa, Cai et al. 2024): a LOSSY verifier for sampling.

A drafted token x after a node is accepted when the target's probability of it there is
above ``min(epsilon, delta * exp(-H))``, H the entropy of the target's distribution at
that node: a token the target finds plausible passes, more readily where the target is
unsure. Of the tree's accepted paths the longest is kept (ties: the likelier one, by the
target's probabilities, as the authors' code picks); then one token is sampled from the
target's distribution after it, exactly as plain sampling would.

The committed text no longer follows the target's distribution (it is not speculative
sampling): what a drafted token may be is bounded by the threshold, not by the target's
odds. Under greedy decoding the rule accepts exactly the target's argmax (its probability
is 1, every other token's 0), so greedy output is unchanged. The target's likeliest token
always passes when ``delta < 1``: its probability is at least exp(-H).

Defaults are the paper's and the authors' evaluation runs': epsilon 0.09 ("posterior
threshold"), delta = sqrt(epsilon) = 0.3 ("posterior alpha").
"""

from __future__ import annotations

import math

import torch

from specdec.errors import InvalidRequestError
from specdec.speculation.sampling import SamplingParams, sample
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier, check_rows


def typical_thresholds(p: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """Per row of ``p``: ``min(epsilon, delta * exp(-entropy))``."""
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    entropy = -(p * logp).sum(-1)
    return torch.clamp(delta * torch.exp(-entropy), max=epsilon)


class TypicalVerifier(Verifier):
    name = "typical"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3) -> None:
        if not 0 < epsilon <= 1 or not 0 < delta <= 1:
            raise InvalidRequestError("typical acceptance needs 0 < epsilon, delta <= 1")
        self.epsilon, self.delta = epsilon, delta

    def verify(
        self,
        tree: DraftTree,
        p: torch.Tensor,
        params: SamplingParams,
        rng: torch.Generator | None,
    ) -> Outcome:
        check_rows(tree, p)
        p = p.double()
        threshold = typical_thresholds(p, self.epsilon, self.delta).tolist()
        children = tree.children()
        # the longest accepted path, depth first; ties to the higher log-probability
        best: tuple[int, float, list[int]] = (0, 0.0, [])
        stack: list[tuple[int, float, list[int]]] = [(-1, 0.0, [])]
        while stack:
            node, logp, path = stack.pop()
            if (len(path), logp) > best[:2]:
                best = (len(path), logp, path)
            row = p[node + 1]
            for c in children[node]:
                q = float(row[tree.tokens[c]])
                if q > threshold[node + 1]:
                    stack.append((c, logp + math.log(q), path + [c]))
        path = best[2]
        last = path[-1] + 1 if path else 0
        return Outcome(path, sample(p[last].float(), rng))
