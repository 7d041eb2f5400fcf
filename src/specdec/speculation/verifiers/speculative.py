"""Lossless speculative sampling over a draft tree.

For a chain this is speculative sampling (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling"). For a tree it is SpecInfer's
multi-step speculative sampling, the VerifyStochastic function of Algorithm 2 in
Miao et al. 2023/2024, "SpecInfer: Accelerating Large Language Model Serving with
Tree-based Speculative Inference and Verification":

At the current node, with the target's distribution ``p`` for the next token,
try the children ``c`` one by one, each with the distribution ``q`` it was
drawn from: accept ``c`` with probability ``min(1, p[c] / q[c])`` and descend
into it with its own row of the target; on a rejection replace ``p`` by the
residual ``norm(max(p - q, 0))`` and try the next child. When no child is left,
the bonus token is drawn from the current ``p`` (the residual after
rejections, else the target's row). The committed tokens then follow the
target's distribution exactly.

Exactness needs each child to be an independent draw from its ``q`` given the
path to it, so i.i.d. siblings drawn from one ``q`` *with replacement* are what
makes the recursive rule exact (a rejected sibling says nothing about the next
one except through the residual). Deterministic children (``q`` None, e.g. the
drafter's top-k) are treated as draws from a point mass on their token: the
acceptance probability is ``p[c]`` and the residual is ``p`` with ``c`` zeroed
and renormalised, which is exact for any fixed set of distinct tokens.

Recursive Speculative Decoding (Jeon et al. 2024, "Recursive Speculative
Decoding: Accelerating LLM Inference via Sampling Without Replacement") is this
same rule, with no verifier of its own: its siblings are drawn *without*
replacement (RSD-C: Gumbel-Top-k; RSD-S: stochastic beam search), and each
carries as its ``q`` the drafter's distribution with the earlier siblings
removed and renormalised, the distribution it was drawn from given them
(`specdec.speculation.without_replacement`). The rule stays exact because what it
needs holds: given the earlier siblings and their rejections, a child is a
draw from its own ``q``, and the residual after a rejection does not depend on
the rejected token. Whether one more sibling exists may depend on the earlier
ones but not on its own token (beam search keeps a variable number per parent,
by perturbed scores that are independent of which token comes next): stopping
early only means drawing from the residual, which has the same distribution.

Deviations from SpecInfer's pseudocode, none of which changes the output
distribution: children are tried in tree order rather than in random order;
deterministic children use the point mass above where SpecInfer divides by the
small model's probability (which is not exact for top-k children); the coin is
``u < p[c] / q[c]`` with ``u`` uniform on [0, 1), so a token the target gives
probability 0 is never accepted.
"""

from __future__ import annotations

import torch

from specdec.speculation.sampling import SamplingParams, sample
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier, check_rows


class SpeculativeSampler(Verifier):
    name = "sampling"
    lossless = True

    def verify(
        self,
        tree: DraftTree,
        p: torch.Tensor,
        params: SamplingParams,
        rng: torch.Generator | None,
    ) -> Outcome:
        check_rows(tree, p)
        p = p.detach().to("cpu", torch.float64)
        children = tree.children()
        path: list[int] = []
        node, dist = -1, p[0]
        while True:
            accepted = None
            for child in children[node]:
                q = self._proposal(tree, child, dist.shape[-1])
                token = tree.tokens[child]
                coin = float(torch.rand(1, generator=rng, dtype=torch.float64))
                if coin < float(dist[token]) / float(q[token]):  # probability min(1, p/q)
                    accepted = child
                    break
                dist = self._residual(dist, q)
            if accepted is None:
                return Outcome(path, sample(dist, rng))
            path.append(accepted)
            node, dist = accepted, p[accepted + 1]

    @staticmethod
    def _proposal(tree: DraftTree, node: int, vocab: int) -> torch.Tensor:
        """The distribution node ``node`` was drawn from (a point mass if it was chosen)."""
        token = tree.tokens[node]
        q = tree.q[node]
        if q is None:
            q = torch.zeros(vocab, dtype=torch.float64)
            q[token] = 1.0
            return q
        q = q.detach().to("cpu", torch.float64)
        if q.shape[-1] != vocab:
            raise ValueError(f"node {node}: q has {q.shape[-1]} entries, p has {vocab}")
        if not q[token] > 0:
            raise ValueError(
                f"node {node}: token {token} has probability {float(q[token])} under the q it "
                "was drawn from; q must be the drafter's distribution the token was sampled from"
            )
        return q

    @staticmethod
    def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``norm(max(p - q, 0))``: what ``p`` still has to give after rejecting a draw from ``q``."""
        r = (p - q).clamp_(min=0)
        total = r.sum()
        if not total > 0:  # p == q: the rejection had probability 0; keep p
            return p
        return r / total
