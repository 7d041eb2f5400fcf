"""A method against autoregressive decoding of the same target, prompt by prompt.

    python -m specdec.bench.pair --model qwen2.5-coder-1.5b --method draft \
        --option draft_model=qwen2.5-coder-0.5b --option num_draft_tokens=4

Greedy, interleaved (ar then the method on each prompt, so machine drift hits
both), after a warm-up. Reports τ, tokens/s, the speedup as the ratio of summed
wall times and as the median of per-prompt ratios, and whether each output is
identical to `ar` — with the first differing position and the target's top-2
logit margin there when it is not. (The full Spec-Bench harness is `specdec bench`.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

PROMPTS = {
    "code": [
        "Write a Python function that checks whether a number is prime.",
        "Implement binary search in Python and explain its complexity.",
        "Write a Python class for a stack with push, pop and peek, with docstrings.",
    ],
    "chat": [
        "What are three tips for staying productive when working from home?",
        "Explain the difference between a list and a tuple in Python.",
    ],
    "summarisation": [
        "Summarise in three sentences: The Industrial Revolution began in Britain in the late "
        "18th century. It brought mechanised textile production, the steam engine, and new iron "
        "making processes. Cities grew quickly as people moved from farms to factories, and "
        "working conditions were often harsh. Over the following century the changes spread to "
        "Europe and North America, raising output and eventually living standards.",
    ],
    "math": [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May? Think step by step.",
        "A train travels 120 km in 1.5 hours. What is its average speed in km/h? Show the steps.",
    ],
}


def first_difference(gen, prompt_ids, a, b) -> dict | None:
    if a == b:
        return None
    i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    target = gen.target
    target.reset()
    logits = target.forward(prompt_ids + a[:i], logits_rows=slice(-1, None))[-1]
    top = torch.topk(logits.float(), 2)
    return {
        "position": i,
        "ar_token": a[i] if i < len(a) else None,
        "method_token": b[i] if i < len(b) else None,
        "top2_margin": round(float(top.values[0] - top.values[1]), 4),
    }


def main(argv: list[str] | None = None) -> int:
    from specdec.api import Generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--method", required=True)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="prompts per category")
    args = ap.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.option)
    gen = Generator.load(args.model, dtype=args.dtype, progress=False)
    gen.generate("Hello", max_new_tokens=8, method=args.method, **opts)  # warm-up both paths
    gen.generate("Hello", max_new_tokens=8)
    rows = []
    for category, prompts in PROMPTS.items():
        for prompt in prompts[: args.limit]:
            ids = gen.prompt_ids(prompt)
            base = gen.generate(prompt, max_new_tokens=args.max_new_tokens)
            ar_ids, ar_s = list(base.token_ids), base.stats.wall_s
            res = gen.generate(
                prompt, max_new_tokens=args.max_new_tokens, method=args.method, **opts
            )
            s = res.stats
            row = {
                "category": category,
                "new_tokens": s.new_tokens,
                "tau": round(s.tau, 2),
                "ar_tokens_per_s": round(base.stats.tokens_per_s, 2),
                "tokens_per_s": round(s.tokens_per_s, 2),
                "speedup": round(ar_s / s.wall_s, 3),
                "ar_wall_s": round(ar_s, 3),
                "wall_s": round(s.wall_s, 3),
                "draft_s": round(s.draft_s, 3),
                "verify_s": round(s.verify_s, 3),
                "identical": ar_ids == res.token_ids,
                "difference": first_difference(gen, ids, ar_ids, list(res.token_ids)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "model": args.model,
        "dtype": args.dtype,
        "method": args.method,
        "options": opts,
        "prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "tau": round(
            sum(r["new_tokens"] for r in rows) / sum(r["new_tokens"] / r["tau"] for r in rows), 2
        ),
        "speedup_sum": round(sum(r["ar_wall_s"] for r in rows) / sum(r["wall_s"] for r in rows), 3),
        "speedup_median": round(statistics.median(r["speedup"] for r in rows), 3),
        "identical": f"{sum(r['identical'] for r in rows)}/{len(rows)}",
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
