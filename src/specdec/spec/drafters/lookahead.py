"""Lookahead decoding: Jacobi iterations in a 2-D window feed an n-gram pool; its n-grams
that start with the last token are verified.

Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding" (code: hao-ai-lab/LookaheadDecoding). The window has
``ngram - 1`` levels, each a past Jacobi iteration over ``window`` positions
ahead of the input token; level 0 has ``window - 1`` tokens (the input token
is its column 0), the others ``window``. One target pass runs, beside the
input token:

- the lookahead branch: level 0 as a chain after the input token (position
  ``p + 1 + i``), and from the column-``j`` token of that chain (the input
  token for ``j = 0``) a chain of the column-``j`` tokens of levels
  1 .. ngram-2 (level ``r`` at position ``p + r + j``). This is exactly the
  paper's attention mask, and it is a tree rooted at the input token, so the
  engine runs it as tree nodes;
- the verification branch: up to ``guesses`` n-grams from the pool under the
  input token, as a trie.

From the pass, the target's argmax after the newest level's tokens becomes
the next newest level; every column gives one n-gram (its level-0 token and
the column down the levels and the new token) for the pool, keyed by its
first token, at most ``guesses`` per key, least recently seen dropped. The
window then slides one level, whatever was accepted.

Deviations from the authors' code, none of which changes the output (every
node is a deterministic proposal checked by the lossless verifier): the
window starts full, filled with tokens drawn from the prompt (their code
fills levels over ngram - 2 warm-up steps; the authors call this
unimportant); the prompt's n-grams seed the pool (their ``POOL_FROM_PROMPT``
option, off by default there); the lookahead branch's nodes are ordinary tree
nodes, so a window chain that happens to be right is accepted too, and a
fully accepted guess also gets the bonus token; defaults are small (ngram 4,
window 4, guesses 4: 23 nodes per pass), since on a CPU a pass over many
tokens is not free (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import torch

from specdec.errors import InvalidRequestError
from specdec.spec.drafters.base import Drafter, DraftState
from specdec.spec.tree import DraftTree
from specdec.spec.verifiers.base import Outcome


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(
        self, window: int = 4, ngram: int = 4, guesses: int = 4, pool_from_prompt: bool = True
    ) -> None:
        if window < 2 or ngram < 3 or guesses < 1:
            raise InvalidRequestError(
                f"lookahead needs window >= 2, ngram >= 3, guesses >= 1; got {window}, {ngram}, "
                f"{guesses}"
            )
        self.W, self.N, self.G = window, ngram, guesses
        self.pool_from_prompt = pool_from_prompt
        self.reset([])

    @property
    def nodes_per_pass(self) -> int:
        return (self.W - 1) + (self.N - 2) * self.W + self.G * (self.N - 1)

    def reset(self, prompt_ids: list[int]) -> None:
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}
        self.levels: list[list[int]] | None = None
        self.pooled = 0  # prompt/committed positions whose n-grams are in the pool
        self._columns: list[int] | None = None  # node of each column's newest-level token
        self._rand = random.Random(0)  # the window's initial tokens: reproducible runs

    def _add(self, key: int, gram: tuple[int, ...]) -> None:
        entries = self.pool.setdefault(key, OrderedDict())
        entries.pop(gram, None)
        entries[gram] = None  # most recent last
        if len(entries) > self.G:
            entries.popitem(last=False)

    def _pool_committed(self, tokens: list[int]) -> None:
        """N-grams of the committed sequence (prompt lookup's source) into the pool."""
        n = self.N
        for start in range(max(self.pooled, 0), len(tokens) - n + 1):
            self._add(tokens[start], tuple(tokens[start + 1 : start + n]))
        self.pooled = max(self.pooled, len(tokens) - n + 1)

    def _init_window(self, tokens: list[int]) -> None:
        self.levels = [
            [self._rand.choice(tokens) for _ in range(self.W - (1 if r == 0 else 0))]
            for r in range(self.N - 1)
        ]

    def propose(self, state: DraftState) -> DraftTree:
        tokens = state.tokens
        if self.levels is None:
            self._init_window(tokens)
        if self.pool_from_prompt:
            self._pool_committed(tokens)
        guesses = list(self.pool.get(tokens[-1], {}))[::-1][: self.G]  # newest first
        depth = min(self.N - 1, state.budget)
        tree = (
            DraftTree.from_paths(
                [list(g[:depth]) for g in guesses],
                [1.0] * len(guesses),
                min(self.G * depth, state.budget),
            )
            if guesses and depth > 0
            else DraftTree()
        )
        self._columns = None
        if len(tree) + self.nodes_per_pass - self.G * (self.N - 1) > state.budget:
            return tree  # no room for the window near the end: guesses only, window kept
        levels = self.levels
        trunk = [-1]  # column j's anchor: the root, then the level-0 chain
        for tok in levels[0]:
            trunk.append(tree.add(tok, trunk[-1]))
        columns = []
        for j in range(self.W):
            node = trunk[j]
            for r in range(1, self.N - 1):
                node = tree.add(levels[r][j], node)
            columns.append(node)
        self._columns = columns
        return tree

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        if self._columns is None or outcome.logits is None or self.levels is None:
            return
        rows = torch.tensor([c + 1 for c in self._columns])  # row i + 1: after node i
        new = outcome.logits[rows].argmax(-1).tolist()
        levels = self.levels
        root = state.tokens[-1]
        for j in range(self.W):
            key = root if j == 0 else levels[0][j - 1]
            self._add(key, tuple(levels[r][j] for r in range(1, self.N - 1)) + (new[j],))
        self.levels = [levels[1][1:], *levels[2:], new]
        self._columns = None
