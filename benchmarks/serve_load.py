"""Load benchmark of `specdec serve` against plain batching and llama-cpp-python's server.

Starts each server in turn on loopback (same GGUF, same prompts: Spec-Bench's first
turns, every category in turn), runs C streaming clients for each C in --concurrency,
and writes a Markdown report with the command that made it:

    .venv/bin/python benchmarks/serve_load.py --out docs/bench/serve-load.md

Servers: ``specdec-auto`` (`specdec serve`, method auto, goodput control),
``specdec-ar`` (`specdec serve --method ar`: continuous batching, no speculation),
``llamacpp`` (`python -m llama_cpp.server`, 2 threads). With --generate, also the
in-process speedup of auto over ar on the same prompts (what `specdec generate`
gets), to compare with the server's at concurrency 1. Greedy outputs of specdec-auto
and specdec-ar are compared request by request. Run it alone: on 2 cores anything
beside it halves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from specdec.bench.load import run_load, table
from specdec.bench.questions import load_dataset

SERVERS = ("specdec-auto", "specdec-ar", "llamacpp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, model: str, port: int, max_batch: int) -> subprocess.Popen:
    py = sys.executable
    if name.startswith("specdec-"):
        method = name.split("-", 1)[1]
        cmd = [py, "-m", "specdec.cli", "serve", "--model", model, "--port", str(port)]
        cmd += ["--method", method, "--max-batch", str(max_batch), "--quiet"]
    elif name == "llamacpp":
        from specdec.models.catalog import resolve_model_file

        gguf = resolve_model_file(model, auto_pull=True, progress=False)
        cmd = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model]
        cmd += ["--port", str(port), "--n_threads", str(os.cpu_count() or 2), "--n_ctx", "4096"]
        cmd += ["--interrupt_requests", "False"]  # queue requests (its default cuts the running one)
    else:
        raise SystemExit(f"unknown server {name!r} (choose from {', '.join(SERVERS)})")
    log = open(f"/tmp/serve-load-{name}.log", "w")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, name: str, timeout_s: float = 900) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited; see /tmp/serve-load-{name}.log")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{name} did not start within {timeout_s:.0f} s")


def generate_speedup(model: str, prompts, max_tokens: int) -> dict:
    """auto over ar in one process on the same prompts: what `specdec generate` gets."""
    import specdec

    gen = specdec.load(model, progress=False)
    gen.generate(prompts[0], max_new_tokens=8, method="auto")  # warm: drafters loaded
    gen.generate(prompts[0], max_new_tokens=8, method="ar")
    total = {"auto": [0, 0.0], "ar": [0, 0.0]}
    for p in prompts:
        for m in ("ar", "auto"):
            r = gen.generate(p, max_new_tokens=max_tokens, method=m)
            total[m][0] += r.stats.new_tokens
            total[m][1] += r.stats.wall_s
    tps = {m: n / s for m, (n, s) in total.items()}
    return {
        "auto_tokens_per_s": tps["auto"],
        "ar_tokens_per_s": tps["ar"],
        "speedup": tps["auto"] / tps["ar"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument(
        "--requests",
        type=int,
        default=2,
        metavar="N",
        help="requests per client (at least 8 per run)",
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--generate", action="store_true", help="also the in-process speedup")
    ap.add_argument("--out", default="serve-load.md")
    args = ap.parse_args()

    data = load_dataset("spec-bench")
    by_cat: dict[str, list] = {}
    for q in data.questions:
        by_cat.setdefault(q.category, []).append(q.turns[0])
    prompts, i = [], 0
    while len(prompts) < 64 and any(i < len(v) for v in by_cat.values()):
        prompts += [v[i] for v in by_cat.values() if i < len(v)]
        i += 1
    messages = [[{"role": "user", "content": p}] for p in prompts]
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, raw = [], {}
    for name in args.servers.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(name, args.model, port, args.max_batch)
        try:
            wait_ready(url, proc, name)
            run_load(url, args.model, messages, 1, 1, 16)  # warm: drafters built, caches touched
            for c in levels:
                n = max(8, args.requests * c)
                r = run_load(url, args.model, messages, c, n, args.max_tokens)
                print(
                    f"{name} c={c}: {r.throughput:.1f} tok/s, tau {r.tau}, errors {r.errors}",
                    file=sys.stderr,
                )
                rows.append((name, r))
                raw[f"{name}@{c}"] = r
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    lines = [
        f"# Load: `specdec serve` on {args.model}",
        "",
        "Command: `"
        + " ".join([".venv/bin/python", "benchmarks/serve_load.py", *sys.argv[1:]])
        + "`",
        "",
        f"Spec-Bench first turns (every category in turn), greedy, max_tokens {args.max_tokens}, "
        f"streamed; each client sends its next request when its answer ends; "
        f"{args.requests} requests per client (at least 8).",
        "",
        table(rows),
        "",
    ]
    for c in levels:
        a, b = raw.get(f"specdec-auto@{c}"), raw.get(f"specdec-ar@{c}")
        if a and b:
            same = sum(x.text == y.text for x, y in zip(a.results, b.results, strict=False))
            lines.append(
                f"- {c} clients: speculation {a.throughput / b.throughput:.2f}x plain batching; "
                f"greedy outputs identical {same}/{min(len(a.results), len(b.results))}"
            )
        lc = raw.get(f"llamacpp@{c}")
        if a and lc:
            lines.append(
                f"- {c} clients: specdec-auto {a.throughput / lc.throughput:.2f}x llama-cpp-python's server"
            )
    if (
        len(levels) > 1
        and raw.get(f"specdec-auto@{levels[0]}")
        and raw.get(f"specdec-auto@{levels[-1]}")
    ):
        lo, hi = raw[f"specdec-auto@{levels[0]}"], raw[f"specdec-auto@{levels[-1]}"]
        lines.append(
            f"- specdec-auto throughput at {levels[-1]} clients: {hi.throughput / lo.throughput:.2f}x that at {levels[0]}"
        )
    if args.generate:
        n = max(8, args.requests)
        g = generate_speedup(args.model, messages[:n], args.max_tokens)
        lines.append(
            f"- in one process (`specdec generate`), same first {n} prompts: auto "
            f"{g['auto_tokens_per_s']:.1f} tok/s, ar {g['ar_tokens_per_s']:.1f} tok/s, "
            f"speedup {g['speedup']:.2f}x"
        )
        a, b = raw.get(f"specdec-auto@{levels[0]}"), raw.get(f"specdec-ar@{levels[0]}")
        if a and b and levels[0] == 1:
            server = a.throughput / b.throughput
            lines.append(
                f"- the server at 1 client: {server:.2f}x, {server / g['speedup']:.0%} of that speedup"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({k: v.summary() for k, v in raw.items()}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
