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

Deviation for targets whose pass grows with its tokens (given the target's
pass-cost curve; the paper runs the whole window every step): the guesses'
trie is cut to what pays (`TrieSizer`, as prompt lookup's), and the window,
an investment whose tokens are rarely accepted in the pass that carries them,
is run only while it pays for its nodes. Its worth is learnt online: the
tokens later accepted through n-grams only the window made (or through the
window's own chain), per pass that carried it (a decaying mean, a prior of
half a token). A pass takes the window when (1 + expected guess tokens +
that worth) per unit of pass time beats the pass without it, and, so that its
worth can be learnt again, once in ``EXPLORE_EVERY`` passes regardless; the
levels are not advanced while the window is left out, so such a pass finds
them stale and its worth is measured low, never high.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.speculation.drafters.base import BuildContext, DraftState, TrieDrafter
from specdec.speculation.options import Options, option
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome


@dataclass(frozen=True)
class LookaheadOptions(Options):
    method: ClassVar[str] = "lookahead"
    window: int = option(4, "positions looked ahead (W)", minimum=2)
    ngram: int = option(4, "n-gram size (N): N - 1 Jacobi levels", minimum=3)
    guesses: int = option(4, "n-grams verified per pass (G)", minimum=1)
    pool_from_prompt: bool = option(True, "seed the pool with the prompt's and the output's n-grams")
    size_by_cost: bool = option(
        True,
        "cut the guesses to what pays on the target's measured pass-cost curve, and run the "
        "window only while what it earns pays for its nodes (else every pass runs the whole "
        "window and all guesses)",
    )


class LookaheadDrafter(TrieDrafter):
    name = "lookahead"
    EXPLORE_EVERY = 16
    WORTH_DECAY = 0.95  # per pass with the window: its worth is a mean over ~20 such passes

    description = (
        "Lookahead decoding: Jacobi iterations over a window of future positions, run in "
        "the same pass, fill an n-gram pool whose n-grams starting with the last token are "
        "verified (Fu et al. 2024)"
    )
    Options = LookaheadOptions

    def __init__(self, options: LookaheadOptions | None = None, pass_cost=None, **given) -> None:
        """``options``, or the options as keywords; ``pass_cost``: the target's `PassCost`."""
        o = LookaheadOptions.of(options, given)
        self.W, self.N, self.G = o.window, o.ngram, o.guesses
        self.pool_from_prompt = o.pool_from_prompt
        # given the target's PassCost, the guesses are cut and the window run while it pays
        super().__init__(pass_cost)
        # the window's worth: tokens accepted through what only it made, per pass with it
        # (decayed sums; the prior is half a token over 4 passes); kept across requests
        self._worth_tokens, self._worth_passes = 2.0, 4.0
        self._without_window = 0  # passes since the window was last run
        self.reset([])

    @classmethod
    def build(cls, ctx: BuildContext, options: LookaheadOptions) -> LookaheadDrafter:
        return cls(options, pass_cost=ctx.cost_if(options.size_by_cost))

    @property
    def window_nodes(self) -> int:
        return (self.W - 1) + (self.N - 2) * self.W

    @property
    def nodes_per_pass(self) -> int:
        return self.window_nodes + self.G * (self.N - 1)

    @property
    def window_worth(self) -> float:
        """Tokens accepted, sooner or later, per pass that runs the window."""
        return self._worth_tokens / self._worth_passes

    def reset(self, prompt_ids: list[int]) -> None:
        # first token -> n-gram (the tokens after it) -> made by the window alone
        self.pool: dict[int, OrderedDict[tuple[int, ...], bool]] = {}
        self.levels: list[list[int]] | None = None
        self.pooled = 0  # prompt/committed positions whose n-grams are in the pool
        self._columns: list[int] | None = None  # node of each column's newest-level token
        self._guesses: list[tuple[tuple[int, ...], bool]] = []  # the pass's, with their origin
        self._guess_nodes = 0  # nodes of the pass's tree before the window's
        self._rand = random.Random(0)  # the window's initial tokens: reproducible runs

    def _add(self, key: int, gram: tuple[int, ...], from_window: bool) -> None:
        entries = self.pool.setdefault(key, OrderedDict())
        # the window's only while the committed text has not produced it too
        entries[gram] = entries.pop(gram, True) and from_window  # most recent last
        if len(entries) > self.G:
            entries.popitem(last=False)

    def _pool_committed(self, tokens: list[int]) -> None:
        """N-grams of the committed sequence (prompt lookup's source) into the pool."""
        n = self.N
        for start in range(max(self.pooled, 0), len(tokens) - n + 1):
            self._add(tokens[start], tuple(tokens[start + 1 : start + n]), False)
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
        entries = self.pool.get(tokens[-1], {})
        self._guesses = list(entries.items())[::-1][: self.G]  # newest first
        depth = min(self.N - 1, state.budget)
        paths = [list(g[:depth]) for g, _ in self._guesses] if depth > 0 else []
        limit = min(self.G * depth, state.budget)
        self.start_step()
        tree = self.trie(paths, [1.0] * len(paths), limit, key=0) if paths else DraftTree()
        self._guess_nodes = len(tree)
        self._columns = None
        if len(tree) + self.window_nodes > state.budget or not self._window_pays(len(tree)):
            self._without_window += 1
            return tree  # guesses only, the window kept as it is
        self._without_window = 0
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

    def _window_pays(self, guess_nodes: int) -> bool:
        if self.sizer is None:
            return True
        if (self._without_window + 1) % self.EXPLORE_EVERY == 0:
            return True  # now and then regardless, so its worth is learnt again
        cost, expected = self.sizer.cost, 1.0 + self.sizer.expected
        without = expected / cost(guess_nodes + 1)
        with_window = (expected + self.window_worth) / cost(guess_nodes + self.window_nodes + 1)
        return with_window > without

    def node_scores(self) -> None:
        return None  # the window's nodes have no chance to give: a merge keeps them all

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        super().observe(state, tree, outcome)
        self._credit(tree, outcome.path)
        if self._columns is None or outcome.logits is None or self.levels is None:
            return
        rows = torch.tensor([c + 1 for c in self._columns])  # row i + 1: after node i
        new = outcome.logits[rows].argmax(-1).tolist()
        levels = self.levels
        root = state.tokens[-1]
        for j in range(self.W):
            key = root if j == 0 else levels[0][j - 1]
            self._add(key, tuple(levels[r][j] for r in range(1, self.N - 1)) + (new[j],), True)
        self.levels = [levels[1][1:], *levels[2:], new]
        self._columns = None

    def _credit(self, tree: DraftTree, path: list[int]) -> None:
        """Add the tokens the window earned this pass to its worth: accepted nodes of its own
        chain, or of guesses that no n-gram of the committed text proposed too."""
        if self._columns is not None:
            d = self.WORTH_DECAY
            self._worth_tokens, self._worth_passes = d * self._worth_tokens, d * self._worth_passes
            self._worth_passes += 1
        if not path:
            return
        if path[0] >= self._guess_nodes:  # the window's chain
            self._worth_tokens += len(path)
            return
        accepted = tuple(tree.tokens[i] for i in path)
        made = [w for g, w in self._guesses if g[: len(accepted)] == accepted]
        if made and all(made):
            self._worth_tokens += len(path)
