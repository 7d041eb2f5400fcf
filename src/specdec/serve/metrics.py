"""The server's metrics in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

# histogram buckets: seconds to the first token, seconds per output token, tau, acceptance
BUCKETS = {
    "time_to_first_token_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "time_per_output_token_seconds": (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1),
    "tokens_per_pass": (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 8),
    "draft_acceptance_ratio": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    "request_seconds": (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
}
HELP = {
    "requests_received": "requests queued",
    "requests": "requests ended, by status (ok, cancelled, error)",
    "rejected": "requests refused before queueing, by reason",
    "prompt_tokens": "prompt tokens of ended requests",
    "generation_tokens": "tokens generated",
    "target_passes": "target passes of ended requests (the prefill included)",
    "draft_tokens": "draft tokens verified",
    "accepted_tokens": "draft tokens accepted",
    "time_to_first_token_seconds": "from arrival to the first token",
    "time_per_output_token_seconds": "decoding time per token after the first",
    "tokens_per_pass": "tau: tokens committed per target pass, per request",
    "draft_acceptance_ratio": "accepted over drafted tokens, per request that drafted",
    "request_seconds": "from arrival to the end",
    "engine_seconds": "the engine thread's time, by phase of its steps",
}
PREFIX = "specdec_"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.hist: dict[str, list[float]] = {k: [0] * (len(b) + 1) for k, b in BUCKETS.items()}
        self.sums: dict[str, float] = defaultdict(float)
        self.started = time.time()

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            buckets = BUCKETS[name]
            i = next((j for j, b in enumerate(buckets) if value <= b), len(buckets))
            self.hist[name][i] += 1
            self.sums[name] += value

    def finished(self, request, status: str) -> None:
        """What an ended request adds."""
        s = request.decoding.out.stats
        self.count("requests", status=status, method=request.method or "")
        self.count("prompt_tokens", s.prompt_tokens)
        self.count("generation_tokens", s.new_tokens)
        self.count("target_passes", s.target_passes)
        self.count("draft_tokens", s.drafted)
        self.count("accepted_tokens", s.accepted)
        if request.first_token_s is not None:
            self.observe("time_to_first_token_seconds", request.first_token_s)
        if s.new_tokens > 1:
            tpot = (s.wall_s - s.prefill_s) / (s.new_tokens - 1)
            self.observe("time_per_output_token_seconds", tpot)
        if s.target_passes > 1:
            self.observe("tokens_per_pass", s.tau)
        if s.drafted:
            self.observe("draft_acceptance_ratio", s.accepted / s.drafted)
        self.observe("request_seconds", time.perf_counter() - request.submitted)

    def render(self, gauges: dict[str, float], phases: dict[str, float] | None = None) -> str:
        """The Prometheus text exposition of everything, with ``gauges`` of now and the
        engine's seconds by phase (`BatchEngine.phase_s`)."""
        out: list[str] = []
        if phases:
            full = f"{PREFIX}engine_seconds_total"
            out.append(f"# HELP {full} {HELP['engine_seconds']}")
            out.append(f"# TYPE {full} counter")
            out += [f'{full}{{phase="{k}"}} {_num(v)}' for k, v in phases.items()]
        with self._lock:
            names = sorted({n for n, _ in self.counters})
            for name in names:
                full = f"{PREFIX}{name}_total"
                out.append(f"# HELP {full} {HELP.get(name, name)}")
                out.append(f"# TYPE {full} counter")
                for (n, labels), v in sorted(self.counters.items()):
                    if n == name:
                        out.append(f"{full}{_labels(labels)} {_num(v)}")
            for name, buckets in BUCKETS.items():
                full = f"{PREFIX}{name}"
                out.append(f"# HELP {full} {HELP[name]}")
                out.append(f"# TYPE {full} histogram")
                total = 0
                for b, c in zip((*buckets, "+Inf"), self.hist[name], strict=True):
                    total += c
                    out.append(f'{full}_bucket{{le="{b}"}} {total}')
                out.append(f"{full}_sum {_num(self.sums[name])}")
                out.append(f"{full}_count {total}")
        for name, v in gauges.items():
            full = f"{PREFIX}{name}"
            out.append(f"# TYPE {full} gauge")
            out.append(f"{full} {_num(v)}")
        out.append(f"# TYPE {PREFIX}uptime_seconds gauge")
        out.append(f"{PREFIX}uptime_seconds {_num(time.time() - self.started)}")
        return "\n".join(out) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in labels)
    return "{" + inner + "}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"
