"""`specdec bench`: a Spec-Bench-style harness — methods and peers on the same prompts.

    specdec bench --model qwen2.5-coder-1.5b --methods ar,draft,hf-ar,hf-assisted \
        --draft qwen2.5-coder-0.5b --dataset spec-bench --limit 10 --max-new-tokens 256

How it measures (docs: DESIGN "Measuring speed"):
- every method gets the same chat-templated token ids; a multi-turn question runs turn
  by turn with `ar`'s own answer to the earlier turns in the history (so every method
  sees the same prompt at every turn and stays comparable);
- one warm-up generation per method before any timing; the wall time is measured
  around generation only;
- methods are interleaved prompt by prompt (`ar` first, then each method on the same
  turn), so that machine drift hits all of them alike;
- speedup over `ar` both as the ratio of summed times and as the median of per-prompt
  ratios, and the ratio of summed times after the prompt (each run's own prefill taken
  off: the part speculation can shorten; specdec methods, which time their prefill).
  Sampled runs (temperature > 0) give outputs of other lengths than `ar`'s, so a ratio
  of times would compare different amounts of work: there every speedup is the ratio of
  tokens per second instead (Σ new tokens ÷ Σ wall time, the method's over `ar`'s);
  ``speedup_basis`` in ``summary.json`` says which ("time" or "tokens_per_s");
  τ = tokens committed per target pass (the prefill counts as a pass);
- every greedy output is compared token for token with `ar`'s; where they differ, the
  first differing position and the target's top-2 logit margin there are recorded.

Output folder: ``results.jsonl`` (one row per method × question), ``summary.json``
(settings, exact command, versions, model hashes, machine, aggregates), ``report.md``
and three PNG plots (see `specdec.bench.report`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from specdec.errors import InvalidRequestError

DEFAULT_METHODS = "ar,auto"
WARMUP_TOKENS = 8
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `specdec bench` (``--model``, ``--dtype``, ``--device``, ``--backend``
    come from the CLI's shared model arguments)."""
    p.add_argument(
        "--methods",
        default=None,
        metavar="LIST",
        help=f"comma-separated methods (default {DEFAULT_METHODS}): any of `specdec methods`, "
        "auto, and the peers hf-ar, hf-assisted, hf-pld, llamacpp-ar, llamacpp-pld; ar is "
        "always run (the baseline). METHOD@LABEL runs a variant with its own options "
        "(--option draft@tree.tree=dynamic)",
    )
    p.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="draft model for every method that takes one (draft, hf-assisted, ...)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method option, e.g. draft.num_draft_tokens=6; KEY=VALUE alone goes to every "
        "method that takes KEY (repeatable)",
    )
    p.add_argument(
        "--dataset",
        default="spec-bench",
        metavar="NAME|FILE",
        help="spec-bench (default), humaneval, gsm8k, mixed, or a JSONL file with "
        "question_id, category and turns on each line",
    )
    p.add_argument(
        "--categories",
        default=None,
        metavar="LIST",
        help="comma-separated categories to run (default all)",
    )
    p.add_argument(
        "--limit", type=int, default=None, metavar="N", help="the first N questions per category"
    )
    p.add_argument(
        "--warm-questions",
        type=int,
        default=0,
        metavar="N",
        help="hot start: before timing, run every specdec method but ar over N further "
        "questions per category (those after the --limit measured ones), untimed, so drafters "
        "that learn across requests (recycle, stand, ngram-cache) start warm as in Token "
        "Recycling's paper; default 0 (cold)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="token budget per turn (default 256)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (default): greedy, and outputs are checked against ar's; > 0 samples (seeded)",
    )
    p.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="benchmark an OpenAI-compatible endpoint (chat completions) instead of local "
        "methods; --model is the model name sent to it",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default bench-out/<date>-<time>)",
    )
    p.add_argument(
        "--compare-to",
        default=None,
        metavar="OTHER_DIR",
        help="print the change from the run in OTHER_DIR to this run",
    )
    p.add_argument(
        "--no-run",
        action="store_true",
        help="with --compare-to: run nothing, compare the existing run in --out",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from specdec.bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    if args.no_run:
        if not args.compare_to or not args.out:
            raise InvalidRequestError("--no-run needs --compare-to OTHER_DIR and --out DIR")
        print(report.compare_runs(Path(args.out), Path(args.compare_to)))
        return 0
    if args.compare_to:
        report.load_run(Path(args.compare_to))  # fail before a long run, not after
    out = run_bench(args, argv)
    if args.compare_to:
        print(report.compare_runs(out, Path(args.compare_to)))
    return 0


# --------------------------------------------------------------------------- setup
def parse_methods(text: str | None, server: bool) -> list[str]:
    """Method names, validated, `ar` first (added if missing)."""
    from specdec.bench.runners import PEERS
    from specdec.speculation.methods import METHODS, base_name, is_method

    if server:
        if text is not None:
            raise InvalidRequestError("--server benchmarks the endpoint alone; drop --methods")
        return ["server"]
    names = [m.strip() for m in (text or DEFAULT_METHODS).split(",") if m.strip()]
    if not names:
        raise InvalidRequestError("--methods is empty")
    known = [*METHODS, *PEERS]
    for m in names:
        base = base_name(m)
        ok = base in PEERS or is_method(base)  # is_method: merges (pld+recycle) too
        if not ok or m.endswith("@") or (m != base and m in PEERS):
            raise InvalidRequestError(
                f"unknown method {m!r} (known: {', '.join(known)}; see `specdec methods`)"
            )
    names = list(dict.fromkeys(names))
    if "ar" in names:
        names.remove("ar")
    return ["ar", *names]


def parse_options(
    items: list[str], methods: list[str], draft: str | None, model: str
) -> dict[str, dict[str, Any]]:
    """Per specdec method run, its options (checked by the method table)."""
    from specdec.speculation.methods import base_name, get_method, is_method, resolve
    from specdec.speculation.options import parse_assignments

    def spec_of(m: str):
        return get_method(resolve(m, {}, model)[0])

    ours = [m for m in methods if is_method(base_name(m))]
    opts: dict[str, dict[str, Any]] = {m: {} for m in ours}
    for method, key, value in parse_assignments(items, scoped=True):
        item = f"{method + '.' if method else ''}{key}={value}"
        if method:
            if method not in opts:
                raise InvalidRequestError(
                    f"--option {item}: {method!r} is not among the methods run ({', '.join(ours)})"
                )
            opts[method][key] = value
        else:
            takers = [m for m in ours if key in spec_of(m).option_names()]
            if not takers:
                raise InvalidRequestError(f"--option {item}: no method run takes {key!r}")
            for m in takers:
                opts[m][key] = value
    for m in ours:
        if draft is not None and "draft_model" in spec_of(m).option_names():
            opts[m].setdefault("draft_model", draft)
        spec_of(m).parse(opts[m])
    return opts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_files(spec: str) -> dict[str, Any]:
    """Where a model's weights came from and their sha256 (a known model: the checked hash)."""
    from specdec.models.catalog import KNOWN_MODELS, local_path

    if spec in KNOWN_MODELS:
        km = KNOWN_MODELS[spec]
        path = local_path(spec)
        return {
            "name": spec,
            "files": [
                {
                    "path": str(path) if path else None,
                    "sha256": km.sha256,
                    "bytes": km.size,
                    "checked": "sha256 verified when pulled",
                }
            ],
        }
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            f
            for f in path.iterdir()
            if f.is_file() and f.suffix in (".safetensors", ".json", ".gguf", ".jinja")
        )
    else:
        return {"name": spec, "hub_id": spec, "files": []}
    return {
        "name": spec,
        "files": [{"path": str(f), "sha256": _sha256(f), "bytes": f.stat().st_size} for f in files],
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (
        "specdec",
        "torch",
        "transformers",
        "tokenizers",
        "numpy",
        "gguf",
        "matplotlib",
        "llama-cpp-python",
    ):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_state() -> dict[str, Any] | None:
    """The commit of the source tree specdec runs from, if it is a git checkout (read-only)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def machine(device: str) -> dict[str, Any]:
    """Cores, memory, measured bandwidth (cached once per machine), and the GPU if one is used."""
    import torch

    from specdec.bench import machine as probe

    info = dict(probe.machine_info())
    info.update(platform=platform.platform(), node=platform.node())
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# --------------------------------------------------------------------------- the run
def build_runners(args, methods, options, skipped) -> tuple[Any, dict[str, Any]]:
    """(the Generator or None, runners by method name in run order)."""
    from specdec.bench import runners as R

    if args.server:
        return None, {"server": R.ServerRunner(args.server, args.model)}
    from specdec.api import Generator
    from specdec.models.loading import resolve_dtype

    gen = Generator.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        progress=not args.quiet and sys.stderr.isatty(),
        quant=args.quant,
    )
    out: dict[str, Any] = {}
    hf = [m for m in methods if m.startswith("hf-")]
    target_hf = draft_hf = None
    if hf:
        draft = args.draft or options.get("draft", {}).get("draft_model")
        target_hf, draft_hf = R.load_hf_models(
            gen,
            args.model,
            draft if "hf-assisted" in hf else None,
            # the transformers peers stay in float: the dtype auto gives float linears here
            resolve_dtype(args.dtype, device=args.device),
            args.device,
        )
    for m in methods:
        if m in options:
            out[m] = R.SpecdecRunner(gen, m, options[m])
        elif m.startswith("hf-"):
            out[m] = R.HFRunner(
                m, target_hf, gen.tokenizer, draft_hf if m == "hf-assisted" else None
            )
        elif m.startswith("llamacpp-"):
            why = R.llama_cpp_available()
            path = _gguf_path(args.model)
            if why is None and path is None:
                why = "llama.cpp peers need a GGUF model file"
            if why:
                skipped[m] = why
                continue
            out[m] = R.LlamaCppRunner(m, path, gen.target.max_length, gen.tokenizer)
    return gen, out


def _gguf_path(model: str) -> str | None:
    from specdec.models.catalog import resolve_model_file

    try:
        where = resolve_model_file(model, auto_pull=False, progress=False)
    except Exception:  # noqa: BLE001 -- anything unresolvable is "not a GGUF"
        return None
    return str(where) if isinstance(where, Path) and where.suffix.lower() == ".gguf" else None


def first_difference(target: Any, prompt_ids: list[int], ref: list[int], got: list[int]):
    """Where ``got`` first departs from ``ref`` and the target's top-2 logit margin there
    (one target forward over the prompt and ``ref`` up to that position); None if equal."""
    import torch

    if ref == got:
        return None
    i = next(
        (j for j, (x, y) in enumerate(zip(ref, got, strict=False)) if x != y),
        min(len(ref), len(got)),
    )
    target.reset()
    logits = target.forward(list(prompt_ids) + list(ref[:i]), logits_rows=slice(-1, None))[-1]
    top = torch.topk(logits.float(), 2)
    target.reset()
    return {
        "position": i,
        "ar_token": ref[i] if i < len(ref) else None,
        "method_token": got[i] if i < len(got) else None,
        "top2_margin": round(float(top.values[0] - top.values[1]), 6),
        "target_top2": [int(t) for t in top.indices.tolist()],
    }


def predicted_ms(outs: list[Any], cost: Any) -> tuple[float, float] | None:
    """The cost model: the time of these turns predicted from the target's pass-cost curve
    and the measured drafting time, and the time `ar` would take for the same tokens (one
    one-token pass each). Both include the measured prefill, as the measured wall times
    do. None where the runner does not report what it needs."""
    method = ar = 0.0
    for o in outs:
        if cost is None or None in (o.draft_s, o.pass_sizes, o.prefill_s) or not o.target_passes:
            return None
        # each pass priced by its own size: the curve is not linear (nor even monotone in
        # bfloat16), so the cost at the mean size mis-prices a mix of 1-token and tree passes
        method += o.draft_s * 1e3 + sum(n * cost(size) for size, n in o.pass_sizes.items())
        method += o.prefill_s * 1e3
        ar += max(o.new_tokens - 1, 0) * cost(1) + o.prefill_s * 1e3
    return method, ar


def _row(
    method: str,
    q: Any,
    outs: list[Any],
    ar_outs: list[Any] | None,
    diffs,
    comparable,
    cost=None,
    basis: str = "time",
):
    from specdec.bench import report

    new = sum(o.new_tokens for o in outs)
    wall = sum(o.wall_s for o in outs)
    passes = (
        None if any(o.target_passes is None for o in outs) else sum(o.target_passes for o in outs)
    )

    def total(attr: str) -> int | None:
        vals = [getattr(o, attr) for o in outs]
        return None if any(v is None for v in vals) else sum(vals)

    ar_wall = sum(o.wall_s for o in ar_outs) if ar_outs else None
    ar_new = sum(o.new_tokens for o in ar_outs) if ar_outs else None
    ratio = report.speedup(basis, new, wall, ar_new, ar_wall)
    prefill = total("prefill_s")
    ar_prefill = None
    if ar_outs and all(o.prefill_s is not None for o in ar_outs):
        ar_prefill = sum(o.prefill_s for o in ar_outs)
    first = next(({"turn": t, **d} for t, d in enumerate(diffs) if d), None)
    predicted = predicted_ms(outs, cost)
    return {
        "method": method,
        "question_id": q.question_id,
        "category": q.category,
        "subcategory": q.subcategory,
        "turns": len(outs),
        "prompt_tokens": sum(o.prompt_tokens for o in outs),
        "new_tokens": new,
        "target_passes": passes,
        "drafted": total("drafted"),
        "accepted": total("accepted"),
        "tau": round(new / passes, 6) if passes else None,
        "wall_s": round(wall, 6),
        "tokens_per_s": round(new / wall, 6) if wall > 0 else None,
        "ar_wall_s": round(ar_wall, 6) if ar_wall is not None else None,
        "ar_new_tokens": ar_new,
        # greedy: Σ ar time ÷ Σ time; sampled: tokens/s ÷ ar's tokens/s (`speedup_basis`)
        "speedup": round(ratio, 6) if ratio is not None else None,
        # the prompt's pass is the same work for every method: the time after it is what
        # speculation can shorten (None where a runner does not time its prefill)
        "prefill_s": round(prefill, 6) if prefill is not None else None,
        "ar_prefill_s": round(ar_prefill, 6) if ar_prefill is not None else None,
        "predicted_ms": round(predicted[0], 3) if predicted else None,
        "ar_predicted_ms": round(predicted[1], 3) if predicted else None,
        "predicted_speedup": round(predicted[1] / predicted[0], 6)
        if predicted and predicted[0] > 0
        else None,
        "drafters": report.merge_usage([o.drafters for o in outs if o.drafters]),
        "identical": (first is None) if comparable else None,
        "first_diff": first if comparable else None,
        "finish_reason": [o.finish_reason for o in outs],
        "output": [o.text for o in outs],
        "token_ids": [o.token_ids for o in outs],
    }


def _progress_bars(names: list[str], total: int, enabled: bool) -> dict[str, Any]:
    from tqdm import tqdm

    return {
        m: tqdm(
            total=total,
            desc=f"{m:<14}",
            position=i,
            unit="q",
            file=sys.stderr,
            disable=not enabled,
            leave=True,
            dynamic_ncols=True,
        )
        for i, m in enumerate(names)
    }


def warm_up_drafters(gen, runners, warm_set, args, ctx, show: bool) -> None:
    """Run every specdec method but ar over ``warm_set`` (turn by turn, each with its own
    answers as the history), untimed: what a drafter keeps across requests is then what
    it learnt from those questions, not from none (Token Recycling's "hot start")."""
    from tqdm import tqdm

    warm = {m: r for m, r in runners.items() if r.kind == "specdec" and m != "ar"}
    if not warm:
        return
    turns = sum(len(q.turns) for q in warm_set.questions)
    with tqdm(
        total=turns * len(warm),
        desc="warm-up",
        unit="turn",
        file=sys.stderr,
        disable=not show,
        dynamic_ncols=True,
    ) as bar:
        for r in warm.values():
            for qi, q in enumerate(warm_set.questions):
                history: list[dict[str, str]] = []
                for t, text in enumerate(q.turns):
                    messages = [*history, {"role": "user", "content": text}]
                    ids = gen.prompt_ids(messages)
                    if len(ids) >= ctx:
                        bar.update(len(q.turns) - t)
                        break
                    budget = min(args.max_new_tokens, ctx - len(ids))
                    o = r.run(messages, ids, budget, args.temperature, 10**6 + qi * 100 + t)
                    history = [*messages, {"role": "assistant", "content": o.text}]
                    bar.update(1)


def run_bench(args: argparse.Namespace, argv: list[str]) -> Path:
    """Run the benchmark described by the parsed `specdec bench` arguments; the output folder."""
    from specdec.bench import report
    from specdec.bench.questions import load_dataset

    started = time.time()
    if args.max_new_tokens < 1:
        raise InvalidRequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InvalidRequestError(f"--temperature must be >= 0, got {args.temperature}")
    methods = parse_methods(args.methods, bool(args.server))
    options = {} if args.server else parse_options(args.option, methods, args.draft, args.model)
    if args.server and args.option:
        raise InvalidRequestError("--option does not apply to --server runs")
    if "hf-assisted" in methods and not (args.draft or options.get("draft", {}).get("draft_model")):
        raise InvalidRequestError("hf-assisted needs a draft model: --draft MODEL")
    categories = (
        [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    )
    full = load_dataset(args.dataset)
    dataset = full.select(categories, args.limit)
    if not dataset.questions:
        raise InvalidRequestError("no questions selected")
    warm_set = None
    if args.warm_questions:
        if args.warm_questions < 0:
            raise InvalidRequestError(f"--warm-questions must be >= 0, got {args.warm_questions}")
        if args.limit is None:
            raise InvalidRequestError(
                "--warm-questions needs --limit: the warm-up questions are those after the "
                "measured ones"
            )
        warm_set = full.select(categories, args.warm_questions, skip=args.limit)
        if not warm_set.questions:
            raise InvalidRequestError(
                f"no questions left after the first {args.limit} per category to warm up on"
            )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench-out/{stamp}").expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    show = not args.quiet and sys.stderr.isatty()
    skipped: dict[str, str] = {}
    gen, runners = build_runners(args, methods, options, skipped)
    greedy = args.temperature == 0
    basis = report.speedup_basis(args.temperature)
    ctx = gen.target.max_length if gen is not None else None
    # the target's pass-cost curve, for the cost model's predicted speedups (cached)
    cost = gen.pass_cost() if gen is not None and any(m != "ar" for m in options) else None

    # warm-up: every runner once on the first prompt that fits, before anything is timed
    budget = min(WARMUP_TOKENS, args.max_new_tokens)
    for q in dataset.questions:
        msgs = [{"role": "user", "content": q.turns[0]}]
        ids = gen.prompt_ids(msgs) if gen is not None else None
        if ctx is None or len(ids) + budget <= ctx:
            for r in runners.values():
                r.run(msgs, ids, budget, args.temperature, 0)
            break

    if warm_set is not None:
        warm_up_drafters(gen, runners, warm_set, args, ctx, show)

    bars = _progress_bars(list(runners), len(dataset.questions), show)
    sums = {m: [0, 0.0] for m in runners}  # new tokens, wall
    skipped_questions: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    results = open(out / "results.jsonl", "w", encoding="utf-8")
    try:
        for qi, q in enumerate(dataset.questions):
            history: list[dict[str, str]] = []
            outs: dict[str, list[Any]] = {m: [] for m in runners}
            prompts: list[list[int] | None] = []
            too_long = None
            for t, text in enumerate(q.turns):
                messages = [*history, {"role": "user", "content": text}]
                ids = gen.prompt_ids(messages) if gen is not None else None
                budget = args.max_new_tokens
                if ctx is not None:
                    if len(ids) >= ctx:
                        too_long = f"turn {t + 1} prompt of {len(ids)} tokens does not fit the context of {ctx}"
                        break
                    budget = min(budget, ctx - len(ids))
                prompts.append(ids)
                for m, r in runners.items():
                    outs[m].append(r.run(messages, ids, budget, args.temperature, qi * 100 + t))
                reference = outs["ar" if "ar" in outs else next(iter(outs))][-1]
                history = [*messages, {"role": "assistant", "content": reference.text}]
            if too_long:
                skipped_questions.append({"question_id": q.question_id, "reason": too_long})
                for bar in bars.values():
                    bar.update(1)
                continue
            ar_outs = outs.get("ar")
            for m, r in runners.items():
                comparable = greedy and ar_outs is not None and m != "ar" and r.kind != "server"
                diffs = []
                if comparable:
                    for t, o in enumerate(outs[m]):
                        diffs.append(
                            first_difference(
                                gen.target, prompts[t], ar_outs[t].token_ids, o.token_ids
                            )
                        )
                row = _row(m, q, outs[m], ar_outs, diffs, comparable, cost, basis)
                rows.append(row)
                results.write(json.dumps(row) + "\n")
                s = sums[m]
                s[0] += row["new_tokens"]
                s[1] += row["wall_s"]
                bars[m].set_postfix_str(f"{s[0] / s[1]:.1f} tok/s" if s[1] else "")
                bars[m].update(1)
            results.flush()
    finally:
        results.close()
        for bar in bars.values():
            bar.close()

    summary = {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["specdec", *argv]),
        "argv": argv,
        "cwd": os.getcwd(),
        "versions": versions(),
        "git": git_state(),
        "machine": machine(args.device),
        "settings": {
            "model": args.model,
            "draft": args.draft,
            "dtype": args.dtype,
            "quant": args.quant,
            # what the target's linears hold after `auto` and the compute dtype around them
            "weights": None
            if getattr(gen, "loaded", None) is None
            else {"quant": gen.loaded.quant, "dtype": str(gen.loaded.model.dtype)},
            "device": args.device,
            "backend": args.backend,
            "server": args.server,
            "dataset": dataset.name,
            "categories": categories,
            "limit": args.limit,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "warmup_tokens": WARMUP_TOKENS,
            # hot start: the questions every specdec method but ar ran, untimed, before timing
            "warm_questions": args.warm_questions,
            "warm_question_ids": [q.question_id for q in warm_set.questions] if warm_set else [],
            "context": ctx,
        },
        "model_files": None
        if args.server
        else {
            "target": model_files(args.model),
            "drafts": [
                model_files(d)
                for d in sorted(
                    {o["draft_model"] for o in options.values() if o.get("draft_model")}
                    | ({args.draft} if args.draft else set())
                )
            ],
        },
        "dataset": {
            "name": dataset.name,
            "files": dataset.files,
            "questions": len(dataset.questions),
            "categories": {
                c: sum(q.category == c for q in dataset.questions) for c in dataset.categories
            },
        },
        "methods": {m: r.describe() for m, r in runners.items()},
        "skipped_methods": skipped,
        "skipped_questions": skipped_questions,
        # what the speedups are ratios of: "time" (greedy) or "tokens_per_s" (sampled)
        "speedup_basis": basis,
        "results": report.aggregate(rows, basis),
        "differences": report.differences(rows),
        "elapsed_s": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    report.write_report(out, summary, rows)
    if not args.quiet:
        print(report.overall_table(summary), file=sys.stderr)
        for m, why in skipped.items():
            print(f"[specdec] skipped {m}: {why}", file=sys.stderr)
        print(
            f"[specdec] results in {out}/ (report.md, summary.json, results.jsonl)", file=sys.stderr
        )
    return out
