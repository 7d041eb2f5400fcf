"""Facts about this machine that speed is judged against, measured once and cached."""

from __future__ import annotations

import json
import os
import platform
import time

import torch

PROBE = 2  # cached figures from another probe are measured again


def measure_bandwidth_gbs(gib: float = 2.0, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of several passes over a buffer far larger than cache,
    streamed by the native library where it is built (each core its own half, as a decode
    step streams its weights; the best of 20 passes over 0.5 GiB), else a torch `sum`.

    On a shared host the figure moves with the neighbours (here 28-48 GB/s from one
    second to the next), so it is the best seen during the probe, not a typical one."""
    from specdec.kernels import native

    if native.available():
        gbs = native.read_bandwidth_gbs(0.5, repeats=4 * repeats)
        if gbs > 0:
            return gbs
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best / 1e9


def machine_info(refresh: bool = False) -> dict:
    """Cores, threads, memory bandwidth; cached in the specdec cache folder per machine."""
    from specdec.models.catalog import cache_dir

    key = f"{platform.node()}-{os.cpu_count()}-{torch.get_num_threads()}"
    path = cache_dir() / "machine.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if not refresh and cached.get(key, {}).get("probe") == PROBE:
        return cached[key]
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bandwidth_gbs": round(measure_bandwidth_gbs(), 2),
        "probe": PROBE,
    }
    cached[key] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1))
    return info
