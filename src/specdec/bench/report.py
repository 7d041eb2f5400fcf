"""Aggregates, the Markdown report, the plots, and the comparison of two runs.

Files written into a run's folder by `write_report`:
- ``report.md``: per category and overall — τ, tokens/s, speedup over ``ar`` (Σ ar time ÷
  Σ method time, and the median of per-prompt ratios; in a sampled run, whose outputs
  differ in length, ratios of tokens/s instead: `speedup_basis`), share of outputs
  identical to ``ar``; the outputs that differ, with the position and the target's top-2
  margin there;
- ``speedup_by_category.png``: speedup over ``ar`` per category, a bar per method;
- ``tau_vs_speedup.png``: per-prompt τ against per-prompt speedup, a colour per method;
- ``tokens_per_s.png``: the distribution of per-prompt tokens/s, a box per method.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from specdec.errors import InvalidRequestError

PLOTS = ("speedup_by_category.png", "tau_vs_speedup.png", "tokens_per_s.png")
OVERALL = "overall"


# --------------------------------------------------------------------------- aggregates
BASES = {  # speedup basis -> how the report names it
    "time": "Σ time",
    "tokens_per_s": "tokens/s",
}


def speedup_basis(temperature: float) -> str:
    """What a run's speedups are ratios of: ``"time"`` (Σ ar time ÷ Σ method time) when
    greedy, where every method makes `ar`'s tokens; ``"tokens_per_s"`` (the method's
    tokens per second ÷ `ar`'s) when sampled, where the outputs differ in length and a
    ratio of times would compare different amounts of work."""
    return "time" if temperature == 0 else "tokens_per_s"


def speedup(
    basis: str, new: float, wall: float, ar_new: float | None, ar_wall: float | None
) -> float | None:
    """The speedup over `ar` of ``new`` tokens in ``wall`` seconds on ``basis`` (see
    `speedup_basis`); None where `ar` is missing or a time or count is not positive."""
    if ar_wall is None or wall <= 0 or ar_wall <= 0:
        return None
    if basis == "time":
        return ar_wall / wall
    if ar_new is None or new <= 0 or ar_new <= 0:
        return None
    return (new / wall) / (ar_new / ar_wall)


def _stats(rows: list[dict[str, Any]], basis: str = "time") -> dict[str, Any]:
    new = sum(r["new_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    passes = [r["target_passes"] for r in rows]
    timed = [r for r in rows if r["speedup"] is not None]
    compared = [r["identical"] for r in rows if r["identical"] is not None]
    tps = [r["tokens_per_s"] for r in rows if r["tokens_per_s"] is not None]
    has_passes = rows and None not in passes and sum(passes) > 0
    return {
        "prompts": len(rows),
        "new_tokens": new,
        "wall_s": round(wall, 6),
        "target_passes": sum(passes) if has_passes else None,
        "tau": round(new / sum(passes), 3) if has_passes else None,
        "tokens_per_s": round(new / wall, 3) if wall > 0 else None,
        "tokens_per_s_median": round(statistics.median(tps), 3) if tps else None,
        "speedup_sum": _sum_speedup(timed, basis),
        "speedup_median": round(statistics.median(r["speedup"] for r in timed), 6)
        if timed
        else None,
        "decode_speedup_sum": _decode_speedup(timed, basis),
        "predicted_speedup": _predicted(rows),
        "identical": sum(compared) if compared else None,
        "compared": len(compared),
        "identical_share": round(sum(compared) / len(compared), 4) if compared else None,
        "drafters": merge_usage([r.get("drafters") for r in rows if r.get("drafters")]),
    }


def _sum_speedup(rows: list[dict[str, Any]], basis: str) -> float | None:
    """Over rows with an `ar` baseline: Σ ar time ÷ Σ method time, or on the tokens/s
    basis (Σ new tokens ÷ Σ time) ÷ (Σ ar's new tokens ÷ Σ ar time)."""
    if not rows:
        return None
    ar_new = None
    if all(r.get("ar_new_tokens") is not None for r in rows):
        ar_new = sum(r["ar_new_tokens"] for r in rows)
    ratio = speedup(
        basis,
        sum(r["new_tokens"] for r in rows),
        sum(r["wall_s"] for r in rows),
        ar_new,
        sum(r["ar_wall_s"] for r in rows),
    )
    return round(ratio, 6) if ratio is not None else None


def _decode_speedup(rows: list[dict[str, Any]], basis: str = "time") -> float | None:
    """`_sum_speedup` after the prompt's pass (each run's own prefill taken off its time):
    the part of a request that speculation can shorten. On the tokens/s basis the tokens
    are those after each turn's first (the prompt's pass makes the first one). None
    unless every row has it."""
    if not rows or any(r.get("prefill_s") is None or r.get("ar_prefill_s") is None for r in rows):
        return None
    ar_new = None
    if all(r.get("ar_new_tokens") is not None for r in rows):
        ar_new = sum(max(r["ar_new_tokens"] - r["turns"], 0) for r in rows)
    ratio = speedup(
        basis,
        sum(max(r["new_tokens"] - r["turns"], 0) for r in rows),
        sum(r["wall_s"] - r["prefill_s"] for r in rows),
        ar_new,
        sum(r["ar_wall_s"] - r["ar_prefill_s"] for r in rows),
    )
    return round(ratio, 6) if ratio is not None else None


def _predicted(rows: list[dict[str, Any]]) -> float | None:
    """The cost model's speedup over these rows (ratio of summed predicted times)."""
    pred = [r for r in rows if r.get("predicted_ms")]
    if not pred or len(pred) < len(rows):
        return None
    return round(sum(r["ar_predicted_ms"] for r in pred) / sum(r["predicted_ms"] for r in pred), 6)


USAGE_SUMS = ("steps", "tokens", "drafted", "accepted", "seconds")


def merge_usage(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]] | None:
    """Per drafter, the sums of what several turns or prompts report (`AutoDrafter.finish`),
    with tokens per step (τ) and tokens per second of its steps; None if none report."""
    from specdec.speculation.drafters.auto import with_rates

    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for arm, use in (part or {}).items():
            mine = out.setdefault(arm, dict.fromkeys(USAGE_SUMS, 0))
            for k in USAGE_SUMS:
                mine[k] += use.get(k, 0)
    out = {arm: with_rates(use) for arm, use in out.items()}
    return out or None


def aggregate(rows: list[dict[str, Any]], basis: str = "time") -> dict[str, dict[str, Any]]:
    """Per method: ``overall`` and ``categories`` (each the `_stats` of its rows), the
    speedups on ``basis`` (see `speedup_basis`)."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        cats = dict.fromkeys(r["category"] for r in mine)
        out[method] = {
            OVERALL: _stats(mine, basis),
            "categories": {c: _stats([r for r in mine if r["category"] == c], basis) for c in cats},
        }
    return out


def differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"method": r["method"], "question_id": r["question_id"], "category": r["category"]}
        | r["first_diff"]
        for r in rows
        if r["identical"] is False
    ]


# --------------------------------------------------------------------------- formatting
def _f(v: Any, fmt: str = "{:.2f}", suffix: str = "") -> str:
    return "—" if v is None else fmt.format(v) + suffix


def _n(k: int, one: str, many: str | None = None) -> str:
    return f"{k} {one if k == 1 else many or one + 's'}"


def _share(s: dict[str, Any]) -> str:
    if s["identical"] is None:
        return "—"
    return f"{s['identical']}/{s['compared']} ({100 * s['identical_share']:.0f} %)"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def basis_of(summary: dict[str, Any]) -> str:
    """The run's speedup basis; runs from before the field were all ratios of times."""
    return summary.get("speedup_basis") or "time"


def basis_note(summary: dict[str, Any]) -> str:
    """One line: what this run's speedups are ratios of, and why."""
    if basis_of(summary) == "time":
        return (
            "Speedups are ratios of times (Σ ar time ÷ Σ method time; `speedup_basis`: time): "
            "greedy, every method makes the same tokens."
        )
    return (
        "Speedups are ratios of tokens/s (the method's Σ new tokens ÷ Σ time over ar's; "
        "`speedup_basis`: tokens_per_s): sampled, the outputs differ in length, so a ratio "
        "of times would compare different amounts of work."
    )


def overall_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "prompts",
        "τ",
        "tokens/s",
        f"speedup ({BASES[basis_of(summary)]})",
        "speedup (median)",
        "after the prompt",
        "predicted (cost model)",
        "identical to ar",
    ]
    body = []
    for m, res in summary["results"].items():
        s = res[OVERALL]
        body.append(
            [
                m,
                str(s["prompts"]),
                _f(s["tau"]),
                _f(s["tokens_per_s"], "{:.1f}"),
                _f(s["speedup_sum"], suffix="×"),
                _f(s["speedup_median"], suffix="×"),
                _f(s.get("decode_speedup_sum"), suffix="×"),
                _f(s.get("predicted_speedup"), suffix="×"),
                _share(s),
            ]
        )
    return header, body


def overall_table(summary: dict[str, Any]) -> str:
    """A plain-text overall table for the terminal."""
    header, body = overall_rows(summary)
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in [header, *body])


def _category_table(summary: dict[str, Any], fmt) -> str:
    cats = list(summary["dataset"]["categories"])
    body = []
    for m, res in summary["results"].items():
        cells = [fmt(res["categories"][c]) if c in res["categories"] else "—" for c in cats]
        body.append([m, *cells, fmt(res[OVERALL])])
    return _table(["method", *cats, OVERALL], body)


def render_markdown(summary: dict[str, Any]) -> str:
    st = summary["settings"]
    mach = summary["machine"]
    target = st["server"] or st["model"]
    by_time = basis_of(summary) == "time"
    lines = [
        f"# specdec bench: {target} on {st['dataset']}",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"- {_n(summary['dataset']['questions'], 'question')} in "
        f"{_n(len(summary['dataset']['categories']), 'category', 'categories')}; "
        f"up to {st['max_new_tokens']} new "
        f"tokens per turn; temperature {st['temperature']} "
        f"({'greedy' if st['temperature'] == 0 else 'sampled'})",
        *(
            [
                f"- hot start: every specdec method but ar first ran "
                f"{_n(len(st['warm_question_ids']), 'other question')} untimed "
                f"({st['warm_questions']} per category, after the measured ones)"
            ]
            if st.get("warm_question_ids")
            else []
        ),
        f"- model `{st['model']}`"
        + (f", draft `{st['draft']}`" if st["draft"] else "")
        + (f", server {st['server']}" if st["server"] else f", {st['dtype']} on {st['device']}"),
        f"- machine: {mach.get('cpu')}, {mach.get('cpu_count')} cores, {mach.get('torch_threads')} "
        f"torch threads, memory bandwidth {mach.get('bandwidth_gbs')} GB/s"
        + (f", {mach['gpu']}" if mach.get("gpu") else ""),
        f"- {summary['created']}; specdec {summary['versions'].get('specdec')}, torch "
        f"{summary['versions'].get('torch')}, transformers {summary['versions'].get('transformers')}"
        + (f"; git {summary['git']['commit'][:10]}" if summary.get("git") else ""),
        "",
        "Speedup is over `ar` in the same run, methods interleaved prompt by prompt after a "
        + (
            "warm-up: Σ ar time ÷ Σ method time, and the median of per-prompt ratios. "
            "After the prompt = the same ratio with each run's prompt pass (prefill) taken off "
            "both times: the part speculation can shorten (specdec methods only). "
            if by_time
            else "warm-up. This run samples, so its outputs differ in length from `ar`'s: "
            "every speedup is a ratio of tokens per second, (Σ method new tokens ÷ Σ method "
            "time) ÷ (Σ ar new tokens ÷ Σ ar time), and the median of per-prompt ratios of "
            "tokens/s. After the prompt = the same ratio with each run's prompt pass (prefill) "
            "taken off its time and the token it makes off its count: the part speculation "
            "can shorten (specdec methods only). "
        )
        + "τ = tokens committed per target pass (the prefill counts as one). "
        "Predicted = the cost model: `ar`'s decode time (one-token passes) ÷ the method's "
        "measured drafting time plus its target passes priced by the target's measured "
        "pass-cost curve (`specdec.models.pass_cost`); far from the measured speedup means "
        "time goes somewhere the model does not see.",
        "",
        "## Overall",
        "",
        _table(*overall_rows(summary)),
        "",
        basis_note(summary),
        "",
        "## Per category",
        "",
        "### Speedup over ar (Σ ar time ÷ Σ method time)"
        if by_time
        else "### Speedup over ar (method's tokens/s ÷ ar's tokens/s)",
        "",
        _category_table(summary, lambda s: _f(s["speedup_sum"], suffix="×")),
        "",
        "### Speedup over ar after the prompt (prefill taken off both times)"
        if by_time
        else "### Speedup over ar after the prompt (tokens/s after each prompt's pass)",
        "",
        _category_table(summary, lambda s: _f(s.get("decode_speedup_sum"), suffix="×")),
        "",
        "### Speedup over ar (median of per-prompt ratios)"
        if by_time
        else "### Speedup over ar (median of per-prompt ratios of tokens/s)",
        "",
        _category_table(summary, lambda s: _f(s["speedup_median"], suffix="×")),
        "",
        "### τ (tokens per target pass)",
        "",
        _category_table(summary, lambda s: _f(s["tau"])),
        "",
        "### Tokens/s",
        "",
        _category_table(summary, lambda s: _f(s["tokens_per_s"], "{:.1f}")),
        "",
        "### Identical to ar",
        "",
        _category_table(summary, _share),
        "",
    ]
    lines += _usage_section(summary)
    diffs = summary["differences"]
    lines += ["## Outputs that differ from ar", ""]
    if diffs:
        lossless = {m for m, d in summary["methods"].items() if d.get("lossless")}
        lines += [
            "First differing token of each; the target's top-2 logit margin at that position "
            "(near 0: a floating-point near-tie, not a bug in a lossless method).",
            "",
            _table(
                [
                    "method",
                    "lossless",
                    "question",
                    "turn",
                    "position",
                    "ar token",
                    "method token",
                    "top-2 margin",
                ],
                [
                    [
                        d["method"],
                        "yes" if d["method"] in lossless else "no",
                        str(d["question_id"]),
                        str(d["turn"] + 1),
                        str(d["position"]),
                        str(d["ar_token"]),
                        str(d["method_token"]),
                        f"{d['top2_margin']:.4g}",
                    ]
                    for d in diffs
                ],
            ),
            "",
        ]
    elif st["temperature"] == 0 and "ar" in summary["methods"]:
        lines += ["None: every output is token for token `ar`'s.", ""]
    else:
        lines += ["Not compared (sampling, or no `ar` in this run).", ""]
    notes = [f"- {m} skipped: {why}" for m, why in summary["skipped_methods"].items()]
    notes += [
        f"- question {s['question_id']} skipped: {s['reason']}"
        for s in summary["skipped_questions"]
    ]
    methods = summary["methods"]
    notes += [
        f"- {m}: {d['kind']}"
        + (f", resolved to {d['resolved']}" if d.get("resolved") not in (None, m) else "")
        + (f", options {json.dumps(d['options'])}" if d.get("options") else "")
        + (", lossy" if d.get("lossless") is False else "")
        for m, d in methods.items()
    ]
    lines += ["## Methods and notes", "", *notes, "", "## Plots", ""]
    lines += [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def _usage_section(summary: dict[str, Any]) -> list[str]:
    """Per method that reports its drafters (auto) and category: each drafter's share of
    the steps, tokens per step and tokens per second of its steps."""
    lines: list[str] = []
    cats = [*summary["dataset"]["categories"], OVERALL]
    for m, res in summary["results"].items():
        if not res[OVERALL].get("drafters"):
            continue
        lines += [
            f"## What {m} ran",
            "",
            "Per category, each drafter's share of the steps, and what its steps earned: "
            "tokens per step (τ of its steps) and tokens per second (its steps' time end to "
            "end: drafting, the target's pass, verification).",
            "",
        ]
        arms = sorted(res[OVERALL]["drafters"], key=lambda a: -res[OVERALL]["drafters"][a]["steps"])
        body = []
        for arm in arms:
            row = [arm]
            for c in cats:
                s = res[OVERALL] if c == OVERALL else res["categories"].get(c)
                use = (s or {}).get("drafters") or {}
                total = sum(u["steps"] for u in use.values())
                u = use.get(arm)
                row.append(
                    f"{u['steps'] / total:.0%} · τ {u['tau']:.2f} · {u['tokens_per_s']:.1f}/s"
                    if u and total
                    else "—"
                )
            body.append(row)
        lines += [_table(["drafter", *cats], body), ""]
    return lines


# --------------------------------------------------------------------------- plots
def write_plots(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["results"])
    ratio = BASES[basis_of(summary)]
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    cats = [*summary["dataset"]["categories"], OVERALL]
    paths = []

    # speedup per category, a bar per method (ar is the 1.0 line)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) + 2), 4.5))
    shown = [m for m in methods if m != "ar"]
    width = 0.8 / max(1, len(shown))
    any_bar = False
    for i, m in enumerate(shown):
        res = summary["results"][m]
        vals = [
            (res[OVERALL] if c == OVERALL else res["categories"].get(c, {})).get("speedup_sum")
            for c in cats
        ]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cats))]
        ys = [v if v is not None else 0.0 for v in vals]
        any_bar |= any(v is not None for v in vals)
        ax.bar(xs, ys, width, label=m, color=colours[m])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="ar")
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylabel(f"speedup over ar ({ratio})")
    ax.set_title("Speedup per category")
    if not any_bar:
        ax.text(0.5, 0.5, "no ar baseline in this run", transform=ax.transAxes, ha="center")
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(_save(fig, out / PLOTS[0]))

    # tau against speedup, per prompt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    any_point = False
    for m in methods:
        pts = [
            (r["tau"], r["speedup"])
            for r in rows
            if r["method"] == m and r["tau"] is not None and r["speedup"] is not None
        ]
        if pts:
            any_point = True
            ax.scatter(*zip(*pts, strict=True), s=14, alpha=0.6, label=m, color=colours[m])
            s = summary["results"][m][OVERALL]
            ax.scatter(
                [s["tau"]],
                [s["speedup_sum"]],
                s=120,
                marker="*",
                color=colours[m],
                edgecolors="black",
            )
    if not any_point:
        ax.text(0.5, 0.5, "no τ or speedup in this run", transform=ax.transAxes, ha="center")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("τ (tokens per target pass)")
    ax.set_ylabel(f"speedup over ar ({ratio})")
    ax.set_title("τ against speedup (dots: prompts, stars: overall)")
    if any_point:
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(_save(fig, out / PLOTS[1]))

    # tokens/s distribution per method
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) + 2), 4.5))
    data = [
        [r["tokens_per_s"] for r in rows if r["method"] == m and r["tokens_per_s"] is not None]
        for m in methods
    ]
    ax.boxplot([d or [0.0] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
    ax.set_ylabel("tokens/s per prompt")
    ax.set_title("Tokens/s distribution")
    fig.tight_layout()
    paths.append(_save(fig, out / PLOTS[2]))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    write_plots(out, summary, rows)
    (out / "report.md").write_text(render_markdown(summary), encoding="utf-8")


# --------------------------------------------------------------------------- compare
def load_run(folder: Path) -> dict[str, Any]:
    path = Path(folder).expanduser() / "summary.json"
    if not path.is_file():
        raise InvalidRequestError(
            f"{folder}: no summary.json (not a `specdec bench` output folder)"
        )
    try:
        summary = json.loads(path.read_text())
        summary["results"], summary["settings"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequestError(f"{path}: not a `specdec bench` summary") from None
    return summary


def _change(old: Any, new: Any, fmt: str = "{:.2f}") -> str:
    if old is None and new is None:
        return "—"
    if old is None or new is None:
        return f"{_f(old, fmt)} → {_f(new, fmt)}"
    pct = f" ({100 * (new - old) / old:+.1f} %)" if old else ""
    return f"{fmt.format(old)} → {fmt.format(new)}{pct}"


def _speedup_sum_as(
    summary: dict[str, Any], method: str, category: str | None, basis: str
) -> float | None:
    """A method's Σ speedup (overall, or in ``category``) on ``basis``: as the run stored it
    when it used that basis, else recomputed from its totals and `ar`'s (every question
    a method ran, `ar` ran too)."""
    res = summary["results"]

    def stats(m: str) -> dict[str, Any] | None:
        if m not in res:
            return None
        return res[m][OVERALL] if category is None else res[m]["categories"].get(category)

    mine, ar = stats(method), stats("ar")
    if mine is None:
        return None
    if basis_of(summary) == basis:
        return mine["speedup_sum"]
    if ar is None:
        return None
    ratio = speedup(basis, mine["new_tokens"], mine["wall_s"], ar["new_tokens"], ar["wall_s"])
    return round(ratio, 6) if ratio is not None else None


def compare_runs(new_dir: Path, old_dir: Path) -> str:
    """A text table of what changed from the run in ``old_dir`` to the one in ``new_dir``.
    Speedups are on the new run's basis (`speedup_basis`); an old run on the other basis
    has its Σ speedups recomputed from its totals, and its medians left out."""
    old, new = load_run(old_dir), load_run(new_dir)
    basis = basis_of(new)
    same_basis = basis_of(old) == basis
    lines = [f"comparing {new_dir} (new) with {old_dir} (old)"]
    for key in (
        "model",
        "draft",
        "dtype",
        "device",
        "backend",
        "dataset",
        "categories",
        "limit",
        "max_new_tokens",
        "temperature",
        "server",
    ):
        a, b = old["settings"].get(key), new["settings"].get(key)
        if a != b:
            lines.append(f"  setting {key}: {a} → {b}")
    om, nm = old.get("machine", {}), new.get("machine", {})
    for key in ("node", "cpu_count", "torch_threads", "bandwidth_gbs", "gpu"):
        if om.get(key) != nm.get(key):
            lines.append(f"  machine {key}: {om.get(key)} → {nm.get(key)}")
    ov, nv = old.get("versions", {}), new.get("versions", {})
    for key in sorted(set(ov) | set(nv)):
        if ov.get(key) != nv.get(key):
            lines.append(f"  version {key}: {ov.get(key)} → {nv.get(key)}")
    if not same_basis:
        lines.append(
            f"  speedup basis: {basis_of(old)} → {basis}: the old run's Σ speedups recomputed "
            f"from its totals as ratios of {BASES[basis]}, its medians not comparable (—)"
        )
    header = [
        "method",
        "τ",
        "tokens/s",
        f"speedup ({BASES[basis]})",
        "speedup (median)",
        "identical",
    ]
    body = []
    for m in dict.fromkeys([*new["results"], *old["results"]]):
        if m not in old["results"] or m not in new["results"]:
            body.append([m, "only in " + ("new" if m in new["results"] else "old"), "", "", "", ""])
            continue
        a, b = old["results"][m][OVERALL], new["results"][m][OVERALL]
        body.append(
            [
                m,
                _change(a["tau"], b["tau"]),
                _change(a["tokens_per_s"], b["tokens_per_s"], "{:.1f}"),
                _change(_speedup_sum_as(old, m, None, basis), b["speedup_sum"], "{:.3f}"),
                _change(a["speedup_median"] if same_basis else None, b["speedup_median"], "{:.3f}"),
                f"{_share(a)} → {_share(b)}",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*row) for row in [header, *body]]
    cat_lines = []
    for m in new["results"]:
        if m == "ar" or m not in old["results"]:
            continue
        for c, b in new["results"][m]["categories"].items():
            a = old["results"][m]["categories"].get(c)
            if a is not None:
                was = _speedup_sum_as(old, m, c, basis)
                cat_lines.append(
                    f"  {m:<14} {c:<16} speedup {_change(was, b['speedup_sum'], '{:.3f}')}"
                    f", τ {_change(a['tau'], b['tau'])}"
                )
    if cat_lines:
        lines += ["per category:", *cat_lines]
    return "\n".join(lines)
