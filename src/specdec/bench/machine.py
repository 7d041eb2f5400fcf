"""Facts about this machine that speed is judged against, measured once and cached."""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def measure_bandwidth_gbs(gib: float = 2.0, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a few `sum` passes over a buffer far larger than cache."""
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
    from specdec.models.registry import cache_dir

    key = f"{platform.node()}-{os.cpu_count()}-{torch.get_num_threads()}"
    path = cache_dir() / "machine.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if not refresh and key in cached:
        return cached[key]
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bandwidth_gbs": round(measure_bandwidth_gbs(), 2),
    }
    cached[key] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1))
    return info
