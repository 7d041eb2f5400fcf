"""Token Recycling: the target's own runner-up tokens, kept per token, drafted as a tree.

Luo et al. 2024/2025, "Turning Trash into Treasure: Accelerating Inference of
Large Language Models with Token Recycling". Every target pass computes a
distribution after each of its input tokens; its top-k tokens are what tends
to follow that token. An adjacency matrix (vocabulary × k token ids) keeps,
for every token, the top-k of the most recent row the target produced after
it; a verification pass overwrites the rows of all its input tokens (the
root and every drafted node, accepted or not). A draft is a tree grown from
the last committed token through the matrix: the child of rank ``r`` of a
node with token ``t`` is ``matrix[t, r]``. The matrix lives as long as the
drafter (across requests: the paper's "hot start"); with ``matrix_file`` it
starts from that safetensors file and is saved back to it before each new
request and at exit, so what one run learnt warms the next.

Deviation from the paper, whose matrix starts empty (or from earlier queries):
the prefill also computes the target's logits at up to ``prompt_rows`` prompt
positions whose token has no row yet (the tokens most frequent in the prompt
first, each at its last occurrence), so a request's own vocabulary can be
drafted from its first step. On a CPU the target's step is the cost that
counts, and these rows cost only the LM head (about 2 ms each at the 1.5B in
bfloat16); with a cold matrix most early steps otherwise draft nothing.

Deviation from the paper, which verifies one fixed 80-node template: on a
CPU a pass over 80 tokens costs several one-token passes (docs/BENCHMARKS.md),
so the tree here is the template's most likely part. The chance that the
child of rank ``r`` at depth ``d`` is accepted, given its parent was, is
counted online (`RankAcceptance`, a prior of a few observations to start); a
node's score is the product along its path, the expected number of tokens it
adds. The tree
is the ``max_nodes`` best-scoring nodes (best-first over the matrix), and
with a measured pass-cost curve the size that maximises expected tokens per
unit of pass time. Nodes are deterministic proposals (``q`` None): exact
under greedy and speculative sampling.
"""

from __future__ import annotations

import atexit
import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import BuildContext, Drafter, DraftState, unseen_token_rows
from specdec.speculation.options import (
    PROMPT_ROWS_HELP,
    SIZE_BY_COST_HELP,
    Options,
    option,
    optional_str,
)
from specdec.speculation.sizing import RankAcceptance, best_size
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome


@dataclass(frozen=True)
class TokenRecyclingOptions(Options):
    method: ClassVar[str] = "recycle"
    top_k: int = option(8, "candidates kept per token (at most 64)", minimum=1)
    max_nodes: int = option(24, "most tree nodes verified in one pass", minimum=1)
    max_depth: int = option(8, "deepest tree level", minimum=1)
    size_by_cost: bool = option(True, SIZE_BY_COST_HELP)
    matrix_file: str | None = option(
        None,
        "safetensors file the matrix starts from (if it exists) and is saved to (before each "
        "request and at exit)",
        parse=optional_str,
    )
    prompt_rows: int = option(128, PROMPT_ROWS_HELP, minimum=0)

    def check(self) -> None:
        if self.top_k > 64:
            raise InvalidRequestError(f"top_k must be in 1..64, got {self.top_k}")


class TokenRecyclingDrafter(Drafter):
    name = "recycle"
    description = (
        "Token Recycling: the target's own top-k tokens after each token, kept in an "
        "adjacency matrix and updated by every pass, drafted as a tree (Luo et al. 2024)"
    )
    Options = TokenRecyclingOptions

    def __init__(
        self,
        vocab_size: int,
        options: TokenRecyclingOptions | None = None,
        pass_cost=None,
        **given,
    ) -> None:
        """``options``, or the options as keywords; ``pass_cost``: the target's `PassCost`
        (None: always ``max_nodes``)."""
        o = TokenRecyclingOptions.of(options, given)
        self.max_prompt_rows = o.prompt_rows
        self.vocab_size = vocab_size
        self.top_k = top_k = min(o.top_k, vocab_size)  # a row cannot rank more tokens than exist
        self.max_nodes = o.max_nodes
        self.max_depth = max_depth = o.max_depth
        self.pass_cost = pass_cost
        self.matrix_file = matrix_file = o.matrix_file
        self.matrix = torch.full((vocab_size, top_k), -1, dtype=torch.int32)  # -1: unknown
        self._dirty = False  # learnt since the last save
        if matrix_file:
            if Path(matrix_file).exists():
                self.load(matrix_file)
            atexit.register(self._save_if_dirty)
        self.acceptance = RankAcceptance(max_depth, top_k)

    @classmethod
    def build(cls, ctx: BuildContext, options: TokenRecyclingOptions) -> TokenRecyclingDrafter:
        return cls(ctx.vocab_size, options, pass_cost=ctx.cost_if(options.size_by_cost))

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        try:
            m = load_file(path).get("matrix")
        except Exception:  # safetensors raises its own error types for unreadable files
            m = None
        if m is None or m.dtype != torch.int32 or tuple(m.shape) != tuple(self.matrix.shape):
            raise InvalidRequestError(
                f"{path} holds no Token Recycling matrix of shape {tuple(self.matrix.shape)}"
            )
        self.matrix = m

    def save(self, path: str | None = None) -> None:
        from safetensors.torch import save_file

        path = path or self.matrix_file
        if not path:
            raise InvalidRequestError("no file to save the Token Recycling matrix to")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        save_file({"matrix": self.matrix.contiguous()}, tmp)
        Path(tmp).replace(path)  # never a half-written file

    def share_memory(self, other: TokenRecyclingDrafter) -> None:
        self.matrix, self.acceptance = other.matrix, other.acceptance

    def reset(self, prompt_ids: list[int]) -> None:
        self._save_if_dirty()  # what the previous request taught, before this one starts

    def prompt_rows(self, prompt_ids: list[int]) -> list[int]:
        """The last occurrence of each prompt token that has no row yet, the tokens most
        frequent in the prompt first (likeliest to be roots again), at most ``prompt_rows``."""
        if not self.max_prompt_rows or not prompt_ids:
            return []
        unseen = (self.matrix[torch.tensor(prompt_ids), 0] < 0).tolist()
        return unseen_token_rows(prompt_ids, unseen, self.max_prompt_rows)

    def observe_prompt(self, prompt_ids: list[int], rows: list[int], logits: torch.Tensor) -> None:
        self._learn(torch.tensor([prompt_ids[r] for r in rows]), logits)

    def _learn(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """Each input token's row becomes the top-k of the logits computed after it."""
        top = torch.topk(logits[:, : self.vocab_size], self.top_k, dim=-1).indices
        self.matrix[inputs] = top.to(torch.int32)
        self._dirty = True

    def _save_if_dirty(self) -> None:
        if self.matrix_file and self._dirty:
            self.save()
            self._dirty = False

    def propose(self, state: DraftState) -> DraftTree:
        limit = min(self.max_nodes, state.budget)
        self._ranks, self._scores = [], []
        if limit <= 0:
            return DraftTree()
        probs = self.acceptance.probs()
        matrix = self.matrix
        tree = DraftTree()
        scores: list[float] = []
        ranks: list[int] = []
        # best-first: (-score, tie-break, parent node, parent token, depth, rank)
        heap: list[tuple[float, int, int, int, int, int]] = []
        counter = 0

        def push_children(node: int, token: int, score: float, depth: int) -> None:
            nonlocal counter
            if depth >= self.max_depth or depth >= state.budget:
                return
            for r in range(self.top_k):
                counter += 1
                heapq.heappush(heap, (-score * probs[depth][r], counter, node, token, depth, r))

        push_children(-1, state.tokens[-1], 1.0, 0)
        while heap and len(tree) < limit:
            neg, _, parent, parent_token, depth, rank = heapq.heappop(heap)
            token = int(matrix[parent_token, rank])
            if token < 0:
                continue  # nothing recycled yet for this token
            node = tree.add(token, parent)
            scores.append(-neg)
            ranks.append(rank)
            push_children(node, token, -neg, depth + 1)
        if self.pass_cost is not None and len(tree):
            tree = tree.subtree(list(range(best_size(scores, self.pass_cost))))
        self._ranks = ranks[: len(tree)]  # the rank each node was drafted at, for observe
        self._scores = scores[: len(tree)]
        return tree

    def node_scores(self) -> list[float] | None:
        return self._scores

    def keep_only(self, nodes: list[int]) -> None:
        self._ranks = [self._ranks[i] for i in nodes]
        self._scores = [self._scores[i] for i in nodes]

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if len(tree):
            self.acceptance.count(tree.parents, self._ranks, outcome.path)
        if outcome.logits is not None:
            self._learn(torch.tensor([state.tokens[-1]] + tree.tokens), outcome.logits)
