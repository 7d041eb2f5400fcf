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
from specdec.spec.sampling import SamplingParams, probabilities, sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_passes: int = 0  # forward passes of the target, the prefill included
    prefill_s: float = 0.0
    wall_s: float = 0.0  # prefill and decoding

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
        result: Generation | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are committed; ``result`` receives ids, text and stats.

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
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        eos = frozenset() if ignore_eos else self.tokenizer.eos_token_ids
        decoder = self.tokenizer.stream_decoder()
        stats = out.stats
        stats.prompt_tokens = len(prompt_ids)

        t0 = time.perf_counter()
        self.target.reset()
        logits = self.target.forward(prompt_ids, logits_rows=slice(-1, None))
        stats.target_passes += 1
        stats.prefill_s = time.perf_counter() - t0
        pos = len(prompt_ids)
        while True:
            token = self._choose(logits[-1], sampling, gen)
            out.token_ids.append(token)
            stats.new_tokens += 1
            piece = decoder.push([token])
            done = None
            if token in eos:
                done = "stop"
            elif stop and piece:
                cut = _find_stop(out.text + piece, stop, len(out.text))
                if cut is not None:
                    piece, done = (out.text + piece)[len(out.text) : cut], "stop"
            if done is None and stats.new_tokens >= max_new_tokens:
                done, piece = "length", piece + decoder.flush()
            if piece:
                out.text += piece
                stats.wall_s = time.perf_counter() - t0
                yield piece
            if done:
                out.finish_reason = done
                break
            logits = self.target.forward([token], positions=[pos])
            stats.target_passes += 1
            pos += 1
        stats.wall_s = time.perf_counter() - t0

    @staticmethod
    def _choose(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator | None) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return sample(probabilities(logits.double(), sampling), gen)


def _find_stop(text: str, stop: tuple[str, ...], searched: int) -> int | None:
    """Index where the earliest stop string starts, looking only where a new one can end."""
    best = None
    for s in stop:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
