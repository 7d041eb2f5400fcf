"""The decode loop: prefill, then one target pass per step, sample, commit, stream.

Every method runs through this loop; plain autoregressive decoding is the
loop with nothing drafted, so a baseline and a method share every line that
is not the method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from specdec.errors import InvalidRequestError
from specdec.models.target import Target
from specdec.models.tokenizer import Tokenizer
from specdec.speculation.drafters.base import Drafter, DraftState, NoDrafter
from specdec.speculation.sampling import SamplingParams, probabilities
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Verifier


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_passes: int = 0  # forward passes of the target, the prefill included
    prefill_s: float = 0.0
    wall_s: float = 0.0  # prefill and decoding
    drafted: int = 0  # tree nodes proposed
    accepted: int = 0  # drafted tokens the target kept
    # tokens in one pass -> passes of that size (after the prefill): the cost model prices
    # each pass by its own size (the cost curve is not linear, so a mean size would mislead)
    pass_sizes: dict[int, int] = field(default_factory=dict)
    draft_s: float = 0.0  # time in the drafter (propose and observe)
    verify_s: float = 0.0  # time in target passes after the prefill, and in verification
    # what each part of a drafter did (auto: per drafter it ran), when the drafter says
    drafters: dict[str, dict] | None = None

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of wall time, prefill included."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decoding (the first one comes from the prefill)."""
        decode_s = self.wall_s - self.prefill_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0

    @property
    def tau(self) -> float:
        """Tokens committed per target pass."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tokens_per_s=self.tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            tau=self.tau,
        )
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


@dataclass
class Generation:
    """What one call produced; filled in while it streams."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class Pass:
    """One sequence's share of a target pass: new tokens at positions (None: after what the
    cache holds), a tree mask (None: causal), the rows that need logits (None: all) and
    the hidden layers its drafter reads (empty: none)."""

    tokens: list[int]
    positions: list[int] | None = None
    attn_mask: torch.Tensor | None = None
    logits_rows: list[int] | None = None
    hidden_layers: tuple[int, ...] = ()


def run_pass(target: Target, p: Pass) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``p`` through one target alone: its logits, and its hidden states when asked."""
    if p.hidden_layers:  # only then: a target without hidden states takes no such argument
        return target.forward(
            p.tokens,
            positions=p.positions,
            attn_mask=p.attn_mask,
            logits_rows=p.logits_rows,
            return_hidden=True,
            hidden_layers=p.hidden_layers,
        )
    kw = {} if p.attn_mask is None else {"attn_mask": p.attn_mask}
    return target.forward(p.tokens, positions=p.positions, logits_rows=p.logits_rows, **kw), None


class Decoding:
    """One request's decoding as steps, so that one loop (`Engine.stream`) or a batch of
    many (`specdec.batching`) can drive it: `prefill` → `start` (the pass's result), then
    while not `done`: `propose` → `verified`; `close` at the end (also when cut short).

    Each step hands out a `Pass` for the request's own `target` and takes back that
    pass's output; what the request computes never depends on who ran the pass.
    """

    def __init__(
        self,
        target: Target,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams = SamplingParams(),
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
        drafter: Drafter | None = None,
        verifier: Verifier | None = None,
        result: Generation | None = None,
    ) -> None:
        self.out = result if result is not None else Generation()
        if not prompt_ids:
            raise InvalidRequestError("empty prompt")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"max new tokens must be >= 1, got {max_new_tokens}")
        limit = target.max_length
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {limit} tokens"
            )
        self.target = target
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
        self.sampling = sampling
        self.drafter = drafter or NoDrafter()
        self.verifier = verifier or self.drafter.verifier(sampling) or default_verifier(sampling)
        self.rng = (
            torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        )
        self.emit = _Emitter(tokenizer, self.out, self.max_new_tokens, stop, ignore_eos)
        self.stats = self.out.stats
        self.stats.prompt_tokens = len(prompt_ids)
        self.features = self.drafter.feature_layers
        self.tokens: list[int] = []
        # the request's clock and whether its passes are shared (`DraftState`): set by
        # whoever runs the passes (`specdec.batching`)
        self.clock: Callable[[], float] = time.perf_counter
        self.shared = False
        self._started = self._closed = False
        self._filled = 0  # prompt tokens in the target's cache (`prefill` in parts)
        self._t0 = 0.0

    @property
    def done(self) -> bool:
        return self.emit.done

    @property
    def started(self) -> bool:
        """The prompt has been run (`start` took its output)."""
        return self._started

    def prefill(self, max_rows: int | None = None, prompt_rows: bool = True) -> Pass:
        """The prompt's pass (the target's cache is emptied first). With ``max_rows``, its
        next part of at most that many tokens: give each part's output to `start`, and
        ask for the next part until `started` (the batch engine spreads a long prompt
        over several steps, so that the requests decoding beside it are not held up for
        all of it). The parts compute what one pass would, row for row. ``prompt_rows``
        False: the drafter's `Drafter.prompt_rows` are not asked for (their LM-head rows
        cost a busy batch more than its first drafts earn)."""
        prompt = self.prompt_ids
        begin = self._filled
        if begin == 0:
            self._t0 = time.perf_counter()
            last = len(prompt) - 1
            rows = self.drafter.prompt_rows(list(prompt)) if prompt_rows else []
            self._rows = sorted({r for r in rows if 0 <= r < last}) + [last]
            self._parts: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
            self.target.reset()
        end = len(prompt) if max_rows is None else min(len(prompt), begin + max(1, max_rows))
        want = [r - begin for r in self._rows if begin <= r < end]
        self._part = (end, bool(want))
        # a part with no row wanted still gets its last row's logits (then dropped): one
        # row of the LM head, and every pass has logits to give
        return Pass(list(prompt[begin:end]), None, None, want or [end - begin - 1], self.features)

    def start(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> str:
        """A prefill pass's output. Once the whole prompt has run, the first token is
        chosen and committed: its text ("" for the parts before)."""
        end, wanted = self._part
        self._filled = end
        if end < len(self.prompt_ids):
            self._parts.append((logits if wanted else None, hidden))
            return ""
        if self._parts:  # the rows of every part, in order
            logits = torch.cat([x for x, _ in self._parts if x is not None] + [logits])
            if hidden is not None:
                hidden = torch.cat([h for _, h in self._parts] + [hidden])
            self._parts = []
        clock, stats = time.perf_counter, self.stats
        stats.target_passes += 1
        first = self.verifier.verify(
            DraftTree(), probabilities(logits[-1:], self.sampling), self.sampling, self.rng
        ).bonus
        stats.prefill_s = clock() - self._t0
        self.tokens = list(self.prompt_ids)
        t = clock()
        self.drafter.reset(list(self.prompt_ids))
        self._started = True
        self.drafter.observe_prompt(list(self.prompt_ids), self._rows, logits)
        if self.features:
            self.drafter.observe_features(hidden)
        stats.draft_s += clock() - t
        return self._commit([first])

    def _commit(self, new: list[int]) -> str:
        self.tokens += new
        piece = self.emit.push(new)
        self.stats.wall_s = time.perf_counter() - self._t0
        if self.emit.done:
            self.close()
        return piece

    def propose(self, max_nodes: int | None = None) -> Pass:
        """Draft this step's tree and return the pass that verifies it. ``max_nodes``
        caps the tree: the drafter is given that budget, and one that scores its nodes
        (`Drafter.node_scores`) keeps only its best ones; 0 asks the drafter nothing this
        step (it neither proposes nor observes: a step of plain decoding, which every
        drafter catches up on)."""
        clock = time.perf_counter
        left = self.max_new_tokens - self.stats.new_tokens
        budget = left if max_nodes is None else min(left, max_nodes + 1)
        self._state = DraftState(
            self.tokens,
            len(self.prompt_ids),
            self.sampling,
            self.rng,
            budget=budget,
            clock=self.clock,
            shared=self.shared,
        )
        t = clock()
        self._asked = max_nodes != 0
        tree = self.drafter.propose(self._state) if self._asked else DraftTree()
        if max_nodes is not None and len(tree) > max_nodes:
            scores = self.drafter.node_scores()
            if scores is not None:  # its best nodes (scores never grow along a path)
                best = sorted(range(len(tree)), key=lambda i: (-scores[i], i))[:max_nodes]
                keep = sorted(best)
                self.drafter.keep_only(keep)
                tree = tree.subtree(keep)
        self._t1 = clock()
        self.stats.draft_s += self._t1 - t
        self.tree = tree
        start, root = self.target.length, self.tokens[-1]
        if len(tree) == 0:
            return Pass([root], [start], None, None, self.features)
        mask, depth = tree.with_root()
        mask = None if tree.is_chain() else mask  # a chain is causal: no mask needed
        return Pass([root] + tree.tokens, [start + d for d in depth], mask, None, self.features)

    def verified(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> str:
        """The pass's output for this step's tree: keep the accepted path (in the target's
        cache and the drafter's), commit its tokens; their text."""
        clock, stats, tree = time.perf_counter, self.stats, self.tree
        outcome = self.verifier.verify(
            tree, probabilities(logits, self.sampling), self.sampling, self.rng
        )
        outcome.logits = logits
        if self.features:
            outcome.hidden = hidden
        if len(tree):
            self.target.keep([0] + [i + 1 for i in outcome.path])
        t2 = clock()
        stats.verify_s += t2 - self._t1
        stats.target_passes += 1
        stats.drafted += len(tree)
        stats.pass_sizes[len(tree) + 1] = stats.pass_sizes.get(len(tree) + 1, 0) + 1
        stats.accepted += len(outcome.path)
        if self.features:
            self.drafter.observe_features(outcome.hidden[[0] + [i + 1 for i in outcome.path]])
        if self._asked:
            self.drafter.observe(self._state, tree, outcome)
        self.outcome = outcome
        stats.draft_s += clock() - t2
        return self._commit(outcome.tokens(tree))

    def close(self) -> None:
        """The request ended (or was cut short): the drafter says what it did (once)."""
        if self._started and not self._closed:
            self._closed = True
            self.stats.wall_s = time.perf_counter() - self._t0
            self.stats.drafters = self.drafter.finish()


class Engine:
    """Prefill → (propose → one target pass over [root] + tree → verify → commit → observe)*."""

    def __init__(self, target: Target, tokenizer: Tokenizer) -> None:
        self.target = target
        self.tokenizer = tokenizer

    def stream(self, prompt_ids: list[int], **options: Any) -> Iterator[str]:
        """Yield text pieces as tokens are committed; ``result`` receives ids, text and stats.

        ``options`` are `Decoding`'s: ``max_new_tokens``, ``sampling``, ``stop``,
        ``ignore_eos`` (keep going past end-of-sequence tokens, for benchmarks of fixed
        length), ``drafter`` (None decodes autoregressively), ``verifier`` (None takes the
        one the drafter asks for, `Drafter.verifier`, else the lossless one for
        ``sampling``: greedy, or speculative sampling) and ``result``.
        """
        d = Decoding(self.target, self.tokenizer, prompt_ids, **options)
        try:
            piece = d.start(*run_pass(self.target, d.prefill()))
            if piece:
                yield piece
            while not d.done:
                piece = d.verified(*run_pass(self.target, d.propose()))
                if piece:
                    yield piece
        finally:  # also when the caller stops reading early
            d.close()


def default_verifier(sampling: SamplingParams) -> Verifier:
    from specdec.speculation.verifiers.greedy import GreedyVerifier
    from specdec.speculation.verifiers.speculative import SpeculativeSampler

    return GreedyVerifier() if sampling.greedy else SpeculativeSampler()


class _Emitter:
    """Commits tokens to the result one by one, applying EOS, stop strings and the token limit.

    A stop string ends the text where it starts: text that could be the beginning of one is
    held back until the next tokens show whether it is (streamed text cannot be taken back).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        out: Generation,
        max_new_tokens: int,
        stop: tuple[str, ...],
        ignore_eos: bool,
    ) -> None:
        self.out = out
        self.max_new = max_new_tokens
        self.stop = stop
        self.eos = frozenset() if ignore_eos else tokenizer.eos_token_ids
        self.decoder = tokenizer.stream_decoder()
        self.held = ""  # decoded text that may start a stop string
        self.done = False

    def push(self, tokens: list[int]) -> str:
        out, text = self.out, ""
        for token in tokens:
            out.token_ids.append(token)
            out.stats.new_tokens += 1
            piece, self.held = self.held + self.decoder.push([token]), ""
            finish = None
            if token in self.eos:
                finish = "stop"
            elif self.stop and piece:
                so_far = out.text + text
                cut = _find_stop(so_far + piece, self.stop, len(so_far))
                if cut is not None:
                    piece, finish = (so_far + piece)[len(so_far) : cut], "stop"
                else:
                    n = _stop_start_length(piece, self.stop)
                    piece, self.held = piece[: len(piece) - n], piece[len(piece) - n :]
            if finish is None and out.stats.new_tokens >= self.max_new:
                finish, piece = "length", piece + self.held + self.decoder.flush()
            text += piece
            if finish:
                out.finish_reason, self.done = finish, True
                break
        out.text += text
        return text


def _stop_start_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that a stop string starts with."""
    for n in range(min(len(text), max(len(s) for s in stop) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


def _find_stop(text: str, stop: tuple[str, ...], searched: int) -> int | None:
    """Index where the earliest stop string starts, looking only where a new one can end."""
    best = None
    for s in stop:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
