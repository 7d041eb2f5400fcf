"""What one forward pass costs as a function of the number of tokens in it.

On a CPU this curve decides how much speculation pays: a pass over 8 tokens of
a bfloat16 model costs about as much as a pass over one, a llama.cpp pass over
2 tokens already twice as much (../shared/MACHINE.md). Drafters size their trees
by it, and the engine's cost model predicts speedups from it.

The curve is measured once per model, dtype, backend and machine, on up to 256
tokens of cache, and cached as JSON in the specdec cache folder. The measurement
is bounded, because it runs before a user's first generated token: sizes stop once a
pass costs `STOP_RATIO` one-token passes (the curve goes on along its last slope,
and no tree that large pays), and repeats stop at a time budget. On a CPU without
native bfloat16 arithmetic, where a bfloat16 pass costs about one one-token pass per
token, that takes the 1.5B's curve from ~4 minutes to ~15 seconds; on the quantised
kernel it measures every size up to 48 as before.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import specdec.kernels
from specdec.models.catalog import cache_dir

MEASURE_VERSION = 5  # bump when the measurement changes: cached curves are measured again
DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # trees are at most ~32 nodes
STOP_RATIO = 8.0  # no larger size once a pass costs this many one-token passes
BUDGET_S = 20.0  # seconds: the cache's prefill takes at most a quarter; no repeat beyond it


@dataclass
class PassCost:
    """Milliseconds of one pass over ``n`` new tokens, measured at some sizes, interpolated."""

    ms: dict[int, float]

    def __post_init__(self) -> None:
        if not self.ms:
            raise ValueError("a pass-cost curve needs at least one point")
        self.ms = {int(k): float(v) for k, v in sorted(self.ms.items())}
        self._n = list(self.ms)
        self._t = list(self.ms.values())

    def __call__(self, n: int) -> float:
        """Cost of a pass over ``n`` tokens: linear between measured sizes, beyond the last
        one along the last segment's slope."""
        ns, ts = self._n, self._t
        if n <= ns[0] or len(ns) == 1:
            return ts[0]
        i = bisect.bisect_left(ns, n)
        if i < len(ns) and ns[i] == n:
            return ts[i]
        i = min(i, len(ns) - 1)
        n0, n1, t0, t1 = ns[i - 1], ns[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (n - n0) / (n1 - n0)

    def relative(self) -> dict[int, float]:
        """The curve divided by the cost of one token."""
        one = self(1)
        return {n: t / one for n, t in self.ms.items()}


def measure_pass_cost(
    target,
    sizes: Sequence[int] = DEFAULT_SIZES,
    context: int = 256,
    repeats: int = 3,
    vocab: int | None = None,
    stop_ratio: float | None = STOP_RATIO,
    budget_s: float | None = BUDGET_S,
) -> PassCost:
    """Time passes over ``sizes`` new tokens on top of up to ``context`` cached tokens: the
    best of up to ``repeats`` rounds (noise only ever adds time). The first round stops
    after the first size that costs ``stop_ratio`` one-token passes (confirmed by timing
both again); a further round runs
    only while the time spent stays within ``budget_s``, whose first quarter also bounds
    the cache's prefill (None: no bound)."""
    vocab = vocab or target.config.vocab_size
    room = target.max_length - 1
    sizes = sorted(n for n in sizes if n <= room // 2) or [1]  # small contexts: what fits
    context = max(1, min(context, room - max(sizes)))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (context + max(sizes),), generator=gen).tolist()
    target.reset()
    start = time.perf_counter()
    cached = 0
    while cached < context:  # in chunks, so that a slow machine measures on a shorter cache
        chunk = tokens[cached : min(context, cached + 32)]
        target.forward(chunk, logits_rows=slice(-1, None))
        cached += len(chunk)
        if budget_s is not None and time.perf_counter() - start > budget_s / 4:
            break
    new = tokens[cached : cached + max(sizes)]
    best: dict[int, float] = {}

    def timed_pass(n: int) -> float:
        # each size runs twice back to back and the second pass is timed (a pass right
        # after one of another size runs colder than in real decoding, where passes of
        # one size follow each other)
        for _ in range(2):
            t = time.perf_counter()
            target.forward(new[:n])  # every row's logits, as verifying
            elapsed = time.perf_counter() - t
            target.rollback(n)
        return elapsed

    for n in sizes:
        best[n] = timed_pass(n)
        if stop_ratio is not None and best[n] >= stop_ratio * best[sizes[0]]:
            # timed again with the one-token pass before stopping: one pass slowed by
            # another process must not cut the curve (it is cached for good)
            best[sizes[0]] = min(best[sizes[0]], timed_pass(sizes[0]))
            best[n] = min(best[n], timed_pass(n))
            if best[n] >= stop_ratio * best[sizes[0]]:
                break
    # further rounds go round-robin over the sizes, so drift hits every size alike
    for _ in range(repeats - 1):
        round_s = sum(best.values()) * 2
        if budget_s is not None and time.perf_counter() - start + round_s > budget_s:
            break
        for n in best:
            best[n] = min(best[n], timed_pass(n))
    target.reset()
    return PassCost({n: t * 1e3 for n, t in best.items()})


def machine_key() -> str:
    """What the curve depends on besides the model: the machine and the software (the
    native kernel library's build included)."""
    return "|".join(
        [platform.node(), platform.processor() or platform.machine(), str(os.cpu_count()),
         str(torch.get_num_threads()), torch.__version__,
         os.environ.get("SPECDEC_PACK_LINEARS", "1"), _kernel_build()]
    )  # fmt: skip


def _kernel_build() -> str:
    found = sorted(Path(specdec.kernels.__file__).parent.glob("_qgemm*.so"))
    if not found:
        return "no-kernel"
    st = found[0].stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def cached_pass_cost(
    target,
    identity: str,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    progress: bool = True,
    refresh: bool = False,
) -> PassCost:
    """The curve of ``target`` (``identity`` names model file, dtype, device, backend),
    measured on first use on this machine (or when ``refresh``) and read from the cache
    afterwards."""
    raw = f"{MEASURE_VERSION}|{identity}|{machine_key()}|{tuple(sizes)}"
    key = hashlib.sha256(raw.encode()).hexdigest()[:16]
    path = cache_dir() / "pass_cost" / f"{key}.json"
    if path.exists() and not refresh:
        try:
            return PassCost({int(k): v for k, v in json.loads(path.read_text())["ms"].items()})
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file is measured again
    if progress:
        print(
            f"measuring the pass-cost curve of {identity.split('|')[0]} (once per machine, about 20 s) ...",
            file=sys.stderr,
        )
    curve = measure_pass_cost(target, sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"identity": identity, "machine": machine_key(), "ms": curve.ms}))
    tmp.replace(path)
    return curve
