"""Which drafter to run this step: a discounted-UCB bandit on committed tokens per second.

Each arm (a drafter, or plain decoding) is judged by its rate, the tokens it committed
over the seconds its steps took (drafting, the target's pass, verification: what a
step costs here, measured), kept per arm and per *situation*, a small label of the
context the arm's step starts from (e.g. how large a tree prompt lookup found). The
choice is the largest upper confidence bound (Auer et al. 2002) of the rate:

    rate(a, s) + explore * best_rate * sqrt(ln N / n(a, s))

where the counts are discounted (Garivier & Moulines 2011, discounted UCB): every
step multiplies every statistic by ``memory``, so what was learnt long ago weighs
less and an arm that stopped paying is dropped, and one not tried for a while is
tried again, within a request as across requests. A situation an arm has not met
borrows the arm's rate over all situations, as one step's worth of evidence.

The bandit only picks which tree is verified; every tree is verified losslessly, so
no choice changes the output (greedy) or its distribution (sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Tally:
    """Discounted sums of an arm's steps in one situation."""

    steps: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0

    def add(self, tokens: float, seconds: float) -> None:
        self.steps += 1.0
        self.tokens += tokens
        self.seconds += seconds

    def scale(self, factor: float) -> None:
        self.steps *= factor
        self.tokens *= factor
        self.seconds *= factor

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


ALL = "*"  # the situation label of an arm's pooled statistics


class StepBandit:
    """Discounted UCB over arms, per situation. `choose` picks among the arms available
    this step; `update` records what the chosen arm's step committed and cost."""

    def __init__(self, explore: float = 0.2, memory: float = 0.98) -> None:
        if explore < 0:
            raise ValueError(f"explore must be >= 0, got {explore}")
        if not 0.0 < memory <= 1.0:
            raise ValueError(f"memory must be in (0, 1], got {memory}")
        self.explore, self.memory = explore, memory
        self.tallies: dict[tuple[str, str], Tally] = {}

    def _tally(self, arm: str, situation: str) -> Tally:
        return self.tallies.setdefault((arm, situation), Tally())

    def estimate(self, arm: str, situation: str = ALL) -> tuple[float, float]:
        """The arm's rate in ``situation`` and the steps behind it (an unmet situation
        borrows one step's worth of the arm's pooled rate; 0 steps: never tried)."""
        own = self.tallies.get((arm, situation), Tally())
        pooled = self.tallies.get((arm, ALL), Tally())
        if situation == ALL or pooled.steps <= 0:
            return own.rate, own.steps
        w = min(1.0, pooled.steps)  # at most one step of borrowed evidence
        tokens = own.tokens + w * pooled.tokens / pooled.steps
        seconds = own.seconds + w * pooled.seconds / pooled.steps
        return (tokens / seconds if seconds > 0 else 0.0), own.steps + w

    def choose(
        self, available: dict[str, str], setup: dict[str, tuple[float, float]] | None = None
    ) -> str:
        """The arm to run among ``available`` (arm -> its situation this step): one never
        tried first (in the order given), else the largest upper confidence bound.
        ``setup``: arm -> (tokens left, seconds): a one-off cost the arm must pay before
        its first step (a draft model reading the prompt), spread over the tokens left:
        its rate counts as ``tokens / (tokens / rate + seconds)``, and it gets no
        exploration bonus: a one-off cost is paid on the estimate's merits only."""
        estimates = {a: self.estimate(a, s) for a, s in available.items()}
        for arm, (_, steps) in estimates.items():
            if steps <= 1e-9:
                return arm
        for arm, (left, seconds) in (setup or {}).items():
            rate, steps = estimates.get(arm, (0.0, 0.0))
            if arm in estimates and rate > 0 and left > 0:
                estimates[arm] = (left / (left / rate + seconds), steps)
        best = max(rate for rate, _ in estimates.values())
        total = sum(t.steps for (_, s), t in self.tallies.items() if s == ALL)
        log_n = math.log(max(total, math.e))
        setup = setup or {}

        def bound(a: str) -> float:
            rate, steps = estimates[a]
            return rate if a in setup else rate + self.explore * best * math.sqrt(log_n / steps)

        return max(estimates, key=bound)

    def update(self, arm: str, situation: str, tokens: int, seconds: float) -> None:
        """The chosen arm's step committed ``tokens`` in ``seconds``; all else fades."""
        for tally in self.tallies.values():
            tally.scale(self.memory)
        self._tally(arm, ALL).add(tokens, seconds)
        if situation != ALL:
            self._tally(arm, situation).add(tokens, seconds)

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return {
            f"{arm}\t{situation}": [t.steps, t.tokens, t.seconds]
            for (arm, situation), t in sorted(self.tallies.items())
            if t.steps > 1e-6
        }

    def load_json(self, data: dict) -> None:
        """Statistics saved by `to_json` (a damaged entry is skipped)."""
        for key, value in data.items():
            arm, _, situation = str(key).partition("\t")
            try:
                steps, tokens, seconds = (float(v) for v in value)
            except (TypeError, ValueError):
                continue
            if arm and situation and min(steps, tokens, seconds) >= 0:
                self.tallies[(arm, situation)] = Tally(steps, tokens, seconds)
