"""Load on an OpenAI-compatible server: C clients at once, streamed chat completions.

Each client sends the next prompt as soon as its previous answer ended, until the run's
requests are done. Per request: the time to the first token (arrival of the first
content chunk) and the time per output token after it; for the run: completion tokens
per second of wall time (first request sent to last answer ended), and p50/p99 of both
latencies. Token counts come from the server's ``usage`` (asked for with
``stream_options.include_usage``); a server that gives none is counted by content
chunks (one token each, as llama.cpp's server sends them), and the report says so.
Only the standard library: it measures any server, ours or a peer.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from specdec.errors import InvalidRequestError


@dataclass
class RequestResult:
    ttft_s: float | None
    seconds: float
    tokens: int
    counted_by: str  # "usage" or "chunks"
    text: str
    error: str | None = None
    speculation: dict[str, Any] | None = None


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    throughput: float  # completion tokens per second of wall time
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    errors: int
    counted_by: str
    tau: float | None = None  # mean tokens per target pass, when the server reports it
    results: list[RequestResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("results")
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadResult:
        """What `to_dict` gave (a saved run, read back to resume a benchmark)."""
        d = dict(d)
        d["results"] = [RequestResult(**r) for r in d.get("results", [])]
        return cls(**d)


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def stream_chat(
    url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    api_key: str | None = None,
    extra: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
) -> RequestResult:
    """One streamed chat completion, timed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"a server URL is http(s)://host:port, got {url!r}")
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    path = parts.path.rstrip("/")
    path = path if path.endswith("/v1") else path + "/v1"
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)
    t0 = time.perf_counter()
    ttft, chunks, text, usage, spec = None, 0, [], None, None
    try:
        conn.request("POST", path + "/chat/completions", json.dumps(body).encode(), headers)
        r = conn.getresponse()
        if r.status != 200:
            detail = r.read()[:200].decode("utf-8", "replace")
            return RequestResult(
                None, time.perf_counter() - t0, 0, "usage", "", f"HTTP {r.status}: {detail}"
            )
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("error"):
                return RequestResult(
                    ttft,
                    time.perf_counter() - t0,
                    chunks,
                    "chunks",
                    "".join(text),
                    str(obj["error"]),
                )
            usage = obj.get("usage") or usage
            spec = obj.get("speculation") or spec
            for choice in obj.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    chunks += 1
                    text.append(piece)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return RequestResult(
            ttft, time.perf_counter() - t0, chunks, "chunks", "".join(text), str(e)
        )
    finally:
        conn.close()
    seconds = time.perf_counter() - t0
    if usage and isinstance(usage.get("completion_tokens"), int):
        return RequestResult(
            ttft, seconds, usage["completion_tokens"], "usage", "".join(text), None, spec
        )
    return RequestResult(ttft, seconds, chunks, "chunks", "".join(text), None, spec)


def run_load(
    url: str,
    model: str,
    prompts: list[list[dict[str, str]]],
    concurrency: int,
    requests: int,
    max_tokens: int,
    *,
    temperature: float = 0.0,
    api_key: str | None = None,
    extra: dict[str, Any] | None = None,
) -> LoadResult:
    """``requests`` streamed chat completions over ``prompts`` (in turn), ``concurrency``
    at a time."""
    if concurrency < 1 or requests < 1:
        raise InvalidRequestError("concurrency and requests must be >= 1")
    if not prompts:
        raise InvalidRequestError("no prompts")
    results: list[RequestResult | None] = [None] * requests
    lock = threading.Lock()
    next_index = [0]

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests:
                return
            results[i] = stream_chat(
                url,
                model,
                prompts[i % len(prompts)],
                max_tokens,
                temperature=temperature,
                api_key=api_key,
                extra=extra,
            )

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    ok = [r for r in done if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [
        (r.seconds - r.ttft_s) / (r.tokens - 1) for r in ok if r.ttft_s is not None and r.tokens > 1
    ]
    passes = sum(r.speculation.get("target_passes", 0) for r in ok if r.speculation)
    spec_tokens = sum(r.tokens for r in ok if r.speculation)
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        wall_s=wall,
        tokens=tokens,
        throughput=tokens / wall if wall > 0 else 0.0,
        ttft_p50=statistics.median(ttfts) if ttfts else None,
        ttft_p99=_percentile(ttfts, 0.99),
        tpot_p50=statistics.median(tpots) if tpots else None,
        tpot_p99=_percentile(tpots, 0.99),
        errors=len(done) - len(ok),
        counted_by="usage" if all(r.counted_by == "usage" for r in ok) else "chunks",
        tau=spec_tokens / passes if passes else None,
        results=done,
    )


def engine_seconds(url: str) -> dict[str, float]:
    """`specdec serve`'s engine time by phase so far (``/metrics``); {} from a server
    without it."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as r:
            text = r.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("specdec_engine_seconds_total{"):
            phase = line.split('"')[1]
            out[phase] = float(line.rsplit(" ", 1)[1])
    return out


def table(rows: list[tuple[str, LoadResult]]) -> str:
    """A Markdown table of load results, one row per (server, concurrency)."""

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1000:.0f}"

    out = [
        "| server | clients | requests | tokens/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | τ | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        tau = "—" if r.tau is None else f"{r.tau:.2f}"
        out.append(
            f"| {name} | {r.concurrency} | {r.requests} | {r.throughput:.1f} | "
            f"{ms(r.ttft_p50)} / {ms(r.ttft_p99)} | {ms(r.tpot_p50)} / {ms(r.tpot_p99)} | "
            f"{tau} | {r.errors} |"
        )
    return "\n".join(out)
