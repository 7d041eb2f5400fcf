"""How many tokens to draft in a chain: policies separate from the drafters that fill it.

- `FixedLength`: always ``k`` tokens.
- `AdaptiveLength`: lengthen after a fully accepted draft, shorten after a
  rejection (the heuristic of transformers' assisted generation: +2 / -1).
- Either can stop a draft early when the drafter's confidence in its next token
  (its top probability) drops under a threshold, as transformers'
  ``assistant_confidence_threshold`` and DEL-style confidence stopping do.
The policy only decides lengths, so every policy is lossless with every verifier.
"""

from __future__ import annotations

from specdec.errors import InvalidRequestError

ADAPTIVE_HELP = "lengthen after full acceptance (+2), shorten after a rejection (-1)"


class DraftLengthPolicy:
    def __init__(self, k: int, confidence: float = 0.0) -> None:
        if k < 1:
            raise InvalidRequestError(f"draft length must be >= 1, got {k}")
        if not 0.0 <= confidence < 1.0:
            raise InvalidRequestError(f"confidence threshold must be in [0, 1), got {confidence}")
        self.k = k
        self.confidence = confidence

    def length(self) -> int:
        """Most tokens to draft this step."""
        return self.k

    def keep_going(self, top_probability: float) -> bool:
        """Draft another token after one whose drafter probability was ``top_probability``?"""
        return top_probability >= self.confidence

    def observe(self, drafted: int, accepted: int) -> None:
        """The target kept ``accepted`` of ``drafted`` tokens."""


class FixedLength(DraftLengthPolicy):
    pass


class AdaptiveLength(DraftLengthPolicy):
    def __init__(self, k: int, confidence: float = 0.0, k_min: int = 1, k_max: int = 16) -> None:
        super().__init__(k, confidence)
        self.k_min, self.k_max = k_min, max(k_max, k)

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, self.k_min)
