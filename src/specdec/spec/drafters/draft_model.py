"""Draft-model speculation (Leviathan et al. 2023; Chen et al. 2023): a small model of
the same vocabulary drafts a chain of ``k`` tokens, autoregressively.

The drafter keeps its own KV cache in step with the committed sequence: before
drafting it rolls back whatever the target rejected (the longest common prefix
of what it has seen and what was committed survives) and runs the tokens it has
not seen yet in one pass. Under sampling each drafted token is drawn from the
drafter's distribution shaped by the same temperature / top-k / top-p as the
target's, and that distribution travels with the node for the verifier.
How many tokens to draft is the policy's call (`specdec.spec.policies`).
"""

from __future__ import annotations

import torch

from specdec.errors import InvalidRequestError
from specdec.models.target import Target
from specdec.spec.drafters.base import Drafter, DraftState
from specdec.spec.policies import DraftLengthPolicy, FixedLength
from specdec.spec.sampling import probabilities, sample
from specdec.spec.tree import DraftTree
from specdec.spec.verifiers.base import Outcome


class DraftModelDrafter(Drafter):
    name = "draft"
    needs = frozenset({"draft_model"})

    def __init__(
        self,
        draft: Target,
        vocab_size: int,
        num_draft_tokens: int = 4,
        policy: DraftLengthPolicy | None = None,
        branching: list[int] | None = None,
    ) -> None:
        if num_draft_tokens < 1:
            raise InvalidRequestError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.draft = draft
        self.vocab_size = vocab_size  # the target's: q rows must align with the target's p rows
        self.policy = policy or FixedLength(num_draft_tokens)
        # children per node at each depth, e.g. [3, 2, 1]: a static tree instead of a chain
        if branching is not None and (not branching or min(branching) < 1):
            raise InvalidRequestError(f"tree branching must be positive integers, got {branching}")
        self.branching = branching
        self.seen: list[int] = []  # tokens in the draft model's cache, in order

    def reset(self, prompt_ids: list[int]) -> None:
        self.draft.reset()
        self.seen = []

    def _sync(self, tokens: list[int]) -> torch.Tensor:
        """Bring the draft cache to ``tokens``; returns the logits after the last one."""
        common = 0
        limit = min(len(self.seen), len(tokens) - 1)  # always re-run at least the last token
        while common < limit and self.seen[common] == tokens[common]:
            common += 1
        self.draft.rollback(len(self.seen) - common)
        logits = self.draft.forward(tokens[common:], logits_rows=slice(-1, None))
        self.seen = list(tokens)
        return logits[-1]

    def _q(self, logits: torch.Tensor, state: DraftState) -> torch.Tensor:
        q = probabilities(logits, state.sampling)
        if q.shape[-1] != self.vocab_size:  # embedding tables padded differently
            pad = self.vocab_size - q.shape[-1]
            q = torch.nn.functional.pad(q, (0, pad)) if pad > 0 else q[: self.vocab_size]
        return q

    def propose(self, state: DraftState) -> DraftTree:
        if self.branching is not None:
            return self._propose_tree(state)
        k = min(self.policy.length(), state.budget - 1)  # the bonus token always comes on top
        if k <= 0 or len(state.tokens) + k >= self.draft.max_length:
            return DraftTree()
        logits = self._sync(state.tokens)
        greedy = state.sampling.greedy
        tokens: list[int] = []
        qs: list[torch.Tensor | None] = []
        for j in range(k):
            if greedy:
                token, q = int(logits.argmax()), None
            else:
                q = self._q(logits, state)
                token = sample(q, state.rng)
            tokens.append(token)
            qs.append(q)
            if self.policy.confidence > 0:
                top = float((q if q is not None else logits.float().softmax(-1)).max())
                if not self.policy.keep_going(top):
                    break
            if j < k - 1:
                logits = self.draft.forward([token], logits_rows=slice(-1, None))[-1]
                self.seen.append(token)
        return DraftTree.chain(tokens, qs)

    def _children(self, logits: torch.Tensor, width: int, state: DraftState):
        """``width`` children of a node: the top tokens (greedy) or i.i.d. draws from q."""
        if state.sampling.greedy:
            return [(int(t), None) for t in torch.topk(logits, width).indices]
        q = self._q(logits, state)
        return [(sample(q, state.rng), q) for _ in range(width)]

    def _propose_tree(self, state: DraftState) -> DraftTree:
        """A static tree (SpecInfer-style token tree): ``branching[d]`` children per node at depth d.

        The draft model runs one pass per depth over all nodes drafted so far
        with the tree mask, then forgets them: its cache keeps committed tokens only.
        """
        depth_limit = min(len(self.branching), state.budget - 1)
        if depth_limit <= 0 or len(state.tokens) + depth_limit >= self.draft.max_length:
            return DraftTree()
        logits = self._sync(state.tokens)
        tree = DraftTree()
        frontier = [(-1, logits)]
        for depth in range(depth_limit):
            for parent, row in frontier:
                for token, q in self._children(row, self.branching[depth], state):
                    tree.add(token, parent, q)
            if depth == depth_limit - 1:
                break
            mask, depths = tree.with_root()
            start = len(state.tokens)
            out = self.draft.forward(
                tree.tokens, positions=[start + d - 1 for d in depths[1:]], attn_mask=mask[1:, 1:]
            )
            self.draft.rollback(len(tree))
            frontier = [(i, out[i]) for i, d in enumerate(tree.depths) if d == depth]
        return tree

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        self.policy.observe(len(tree), len(outcome.path))
