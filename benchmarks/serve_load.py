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
and specdec-ar are compared request by request.

Throughput of one run varies by a few per cent with how requests happen to share passes:
--rounds R runs every server R times, alternating their order, and reports each
round's ratio of speculation over plain batching and the median run of each server.
Every run is saved to ``<out>.runs.json`` as it ends; the same command started again
resumes from there (a run is redone only if it had not ended). Run it alone: on 2
cores anything beside it halves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from specdec.bench.load import LoadResult, engine_seconds, run_load, table
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
        cmd += [
            "--interrupt_requests",
            "False",
        ]  # queue requests (its default cuts the running one)
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
    ap.add_argument(
        "--rounds", type=int, default=1, help="runs of every server, in alternating order"
    )
    ap.add_argument("--generate", action="store_true", help="also the in-process speedup")
    ap.add_argument("--out", default="serve-load.md")
    args = ap.parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if bad or not servers:
        raise SystemExit(f"unknown server {bad!r} (choose from {', '.join(SERVERS)})")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SystemExit(
            f"--concurrency takes numbers, e.g. 1,4,16; got {args.concurrency!r}"
        ) from None
    if min(levels) < 1 or args.rounds < 1 or args.requests < 1:
        raise SystemExit("--concurrency, --rounds and --requests must be >= 1")

    data = load_dataset("spec-bench")
    by_cat: dict[str, list] = {}
    for q in data.questions:
        by_cat.setdefault(q.category, []).append(q.turns[0])
    prompts, i = [], 0
    while len(prompts) < 64 and any(i < len(v) for v in by_cat.values()):
        prompts += [v[i] for v in by_cat.values() if i < len(v)]
        i += 1
    messages = [[{"role": "user", "content": p}] for p in prompts]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = out.with_suffix(".runs.json")
    setup = {k: getattr(args, k) for k in ("model", "requests", "max_tokens", "max_batch")}
    runs: dict[str, dict] = {}
    if saved.exists():
        try:
            state = json.loads(saved.read_text())
        except ValueError:
            state = {}
        if state.get("setup") == setup:
            runs = state.get("runs", {})
            print(f"resuming: {len(runs)} runs saved in {saved}", file=sys.stderr)
        else:
            print(f"{saved} was made with other settings: starting afresh", file=sys.stderr)

    def save() -> None:
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setup": setup, "runs": runs}))
        tmp.replace(saved)

    for k in range(args.rounds):
        order = servers if k % 2 == 0 else servers[::-1]  # neither always goes first
        for name in order:
            todo = [c for c in levels if f"{name}@{c}#{k}" not in runs]
            if not todo:
                continue
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start(name, args.model, port, args.max_batch)
            try:
                wait_ready(url, proc, name)
                run_load(
                    url, args.model, messages, 1, 1, 16
                )  # warm: drafters built, caches touched
                for c in todo:
                    n = max(8, args.requests * c)
                    before = engine_seconds(url)
                    r = run_load(url, args.model, messages, c, n, args.max_tokens)
                    after = engine_seconds(url)
                    phases = {p: after[p] - before.get(p, 0.0) for p in after}
                    runs[f"{name}@{c}#{k}"] = {"load": r.to_dict(), "engine_s": phases}
                    save()
                    print(
                        f"round {k + 1}/{args.rounds} {name} c={c}: {r.throughput:.1f} tok/s, "
                        f"tau {r.tau}, errors {r.errors}",
                        file=sys.stderr,
                    )
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def of(name: str, c: int) -> list[tuple[LoadResult, dict]]:
        got = [runs.get(f"{name}@{c}#{k}") for k in range(args.rounds)]
        return [(LoadResult.from_dict(g["load"]), g["engine_s"]) for g in got if g]

    def median_run(name: str, c: int) -> LoadResult | None:
        got = [r for r, _ in of(name, c)]
        if not got:
            return None
        mid = statistics.median_low([r.throughput for r in got])
        return next(r for r in got if r.throughput == mid)

    rows = [(n, r) for n in servers for c in levels if (r := median_run(n, c))]
    rounds = (
        f"{args.rounds} rounds; each row is its server's median run"
        if args.rounds > 1
        else "one run each"
    )
    lines = [
        f"# Load: `specdec serve` on {args.model}",
        "",
        "Command: `"
        + " ".join([".venv/bin/python", "benchmarks/serve_load.py", *sys.argv[1:]])
        + "`",
        "",
        f"Spec-Bench first turns (every category in turn), greedy, max_tokens {args.max_tokens}, "
        f"streamed; each client sends its next request when its answer ends; "
        f"{args.requests} requests per client (at least 8); {rounds}.",
        "",
        table(rows),
        "",
    ]
    for c in levels:
        a, b = of("specdec-auto", c), of("specdec-ar", c)
        pairs = [(x, y) for (x, _), (y, _) in zip(a, b, strict=False)]
        if pairs:
            ratios = [x.throughput / y.throughput for x, y in pairs]
            same = sum(
                p.text == q.text
                for x, y in pairs
                for p, q in zip(x.results, y.results, strict=False)
            )
            total = sum(min(len(x.results), len(y.results)) for x, y in pairs)
            each = ", ".join(f"{v:.2f}" for v in ratios)
            spread = (
                f" (rounds: {each}; median {statistics.median(ratios):.2f}x)"
                if len(ratios) > 1
                else ""
            )
            lines.append(
                f"- {c} clients: speculation {statistics.median(ratios):.2f}x plain batching{spread}; "
                f"greedy outputs identical {same}/{total}"
            )
        lc, am = median_run("llamacpp", c), median_run("specdec-auto", c)
        if am and lc:
            lines.append(
                f"- {c} clients: specdec-auto {am.throughput / lc.throughput:.2f}x llama-cpp-python's server"
            )
    for name in ("specdec-auto", "specdec-ar"):
        spent = [e for c in levels for _, e in of(name, c)]
        total = sum(sum(e.values()) for e in spent)
        if total > 0:
            passes = sum(e.get("pass", 0.0) for e in spent)
            lines.append(
                f"- {name}: {passes / total:.1%} of the engine's time in the target's passes, "
                f"{1 - passes / total:.1%} around them (drafting, verifying, requests' "
                "comings and goings)"
            )
    lo, hi = median_run("specdec-auto", levels[0]), median_run("specdec-auto", levels[-1])
    if len(levels) > 1 and lo and hi:
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
        a, b = median_run("specdec-auto", levels[0]), median_run("specdec-ar", levels[0])
        if a and b and levels[0] == 1:
            server = a.throughput / b.throughput
            lines.append(
                f"- the server at 1 client: {server:.2f}x, {server / g['speedup']:.0%} of that speedup"
            )
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({f"{n}@{r.concurrency}": r.summary() for n, r in rows}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
