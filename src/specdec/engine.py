"""The decode loop: prefill, then one target pass per step, sample, commit, stream.

Every method runs through this loop; plain autoregressive decoding is the
loop with nothing drafted, so a baseline and a method share every line that
is not the method.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from specdec.errors import InvalidRequestError
from specdec.models.target import Target
from specdec.models.tokenizer import Tokenizer
from specdec.speculation.drafters.base import Drafter, DraftState, NoDrafter
from specdec.speculation.sampling import SamplingParams, probabilities
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier


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


class Engine:
    """Prefill → (propose → one target pass over [root] + tree → verify → commit → observe)*."""

    def __init__(self, target: Target, tokenizer: Tokenizer) -> None:
        self.target = target
        self.tokenizer = tokenizer

    def stream(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams = SamplingParams(),
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
        drafter: Drafter | None = None,
        verifier: Verifier | None = None,
        result: Generation | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are committed; ``result`` receives ids, text and stats.

        ``drafter`` None decodes autoregressively. ``verifier`` None takes the one the
        drafter asks for (`Drafter.verifier`), else the lossless one for ``sampling``
        (greedy, or speculative sampling).
        ``ignore_eos`` keeps going past end-of-sequence tokens (for benchmarks of fixed length).
        """
        out = result if result is not None else Generation()
        if not prompt_ids:
            raise InvalidRequestError("empty prompt")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"max new tokens must be >= 1, got {max_new_tokens}")
        limit = self.target.max_length
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {limit} tokens"
            )
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
        drafter = drafter or NoDrafter()
        verifier = verifier or drafter.verifier(sampling) or default_verifier(sampling)
        rng = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        emit = _Emitter(self.tokenizer, out, max_new_tokens, stop, ignore_eos)
        stats = out.stats
        stats.prompt_tokens = len(prompt_ids)
        clock = time.perf_counter

        t0 = clock()
        last = len(prompt_ids) - 1
        rows = sorted({r for r in drafter.prompt_rows(list(prompt_ids)) if 0 <= r < last})
        rows.append(last)
        self.target.reset()
        features = drafter.feature_layers
        if features:  # only then: a target without hidden states takes no such argument
            prompt_logits, prompt_hidden = self.target.forward(
                prompt_ids, logits_rows=rows, return_hidden=True, hidden_layers=features
            )
        else:
            prompt_logits = self.target.forward(prompt_ids, logits_rows=rows)
        stats.target_passes += 1
        logits = prompt_logits[-1:]
        first = verifier.verify(DraftTree(), probabilities(logits, sampling), sampling, rng).bonus
        stats.prefill_s = clock() - t0
        tokens = list(prompt_ids)
        new = [first]
        t = clock()
        drafter.reset(list(prompt_ids))
        drafter.observe_prompt(list(prompt_ids), rows, prompt_logits)
        if features:
            drafter.observe_features(prompt_hidden)
        stats.draft_s += clock() - t
        try:
            while True:
                tokens += new
                piece = emit.push(new)
                stats.wall_s = clock() - t0
                if piece:
                    yield piece
                if emit.done:
                    break
                state = DraftState(
                    tokens, len(prompt_ids), sampling, rng, budget=max_new_tokens - stats.new_tokens
                )
                t = clock()
                tree = drafter.propose(state)
                t1 = clock()
                stats.draft_s += t1 - t
                outcome = self._verify_step(tree, tokens[-1], sampling, rng, verifier, features)
                t2 = clock()
                stats.verify_s += t2 - t1
                stats.target_passes += 1
                stats.drafted += len(tree)
                stats.pass_sizes[len(tree) + 1] = stats.pass_sizes.get(len(tree) + 1, 0) + 1
                stats.accepted += len(outcome.path)
                if features:
                    drafter.observe_features(outcome.hidden[[0] + [i + 1 for i in outcome.path]])
                drafter.observe(state, tree, outcome)
                stats.draft_s += clock() - t2
                new = outcome.tokens(tree)
            stats.wall_s = clock() - t0
        finally:  # also when the caller stops reading early
            stats.drafters = drafter.finish()

    def _verify_step(
        self,
        tree: DraftTree,
        root: int,
        sampling: SamplingParams,
        rng: torch.Generator | None,
        verifier: Verifier,
        features: tuple[int, ...] = (),
    ) -> Outcome:
        """One target pass over [root] + tree; keep the root and the accepted path in the cache.
        ``features``: the pass's hidden states at those layers too (`Outcome.hidden`)."""
        start = self.target.length
        hidden = {"return_hidden": True, "hidden_layers": features} if features else {}
        if len(tree) == 0:
            out = self.target.forward([root], positions=[start], **hidden)
        else:
            mask, depth = tree.with_root()
            positions = [start + d for d in depth]
            mask = None if tree.is_chain() else mask  # a chain is causal: no mask needed
            out = self.target.forward(
                [root] + tree.tokens, positions=positions, attn_mask=mask, **hidden
            )
        logits = out[0] if features else out
        outcome = verifier.verify(tree, probabilities(logits, sampling), sampling, rng)
        outcome.logits = logits
        if features:
            outcome.hidden = out[1]
        if len(tree):
            self.target.keep([0] + [i + 1 for i in outcome.path])
        return outcome


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
