"""What one forward pass costs as a function of the number of tokens in it.

On a CPU this curve decides how much speculation pays: a pass over 8 tokens of
a bfloat16 model costs about as much as a pass over one, a llama.cpp pass over
2 tokens already twice as much (../shared/MACHINE.md). Drafters size their trees
by it, and the engine's cost model predicts speedups from it.

The curve is measured once per model, dtype, backend and machine, on a few
hundred tokens of cache, and cached as JSON in the specdec cache folder.
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

MEASURE_VERSION = 3  # bump when the measurement changes: cached curves are measured again
DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # trees are at most ~32 nodes


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
) -> PassCost:
    """Time passes over ``sizes`` new tokens on top of ``context`` cached tokens: the best of
    ``repeats`` rounds (noise only ever adds time)."""
    vocab = vocab or target.config.vocab_size
    room = target.max_length - 1
    sizes = [n for n in sizes if n <= room // 2] or [1]  # small contexts: what fits
    context = max(1, min(context, room - max(sizes)))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (context + max(sizes),), generator=gen).tolist()
    target.reset()
    target.forward(tokens[:context], logits_rows=slice(-1, None))
    best = {n: float("inf") for n in sizes}
    # round-robin over sizes, so drift hits every size alike; within a round each size runs
    # twice back to back and the second pass is timed (a pass right after one of another
    # size runs colder than in real decoding, where passes of one size follow each other)
    for _ in range(repeats):
        for n in sizes:
            for timed in (False, True):
                t = time.perf_counter()
                target.forward(tokens[context : context + n])  # every row's logits, as verifying
                elapsed = time.perf_counter() - t
                target.rollback(n)
                if timed:
                    best[n] = min(best[n], elapsed)
    ms = {n: t * 1e3 for n, t in best.items()}
    target.reset()
    return PassCost(ms)


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
            f"measuring the pass-cost curve of {identity.split('|')[0]} (once per machine) ...",
            file=sys.stderr,
        )
    curve = measure_pass_cost(target, sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"identity": identity, "machine": machine_key(), "ms": curve.ms}))
    tmp.replace(path)
    return curve
