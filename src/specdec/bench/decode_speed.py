"""Autoregressive decode speed of the native runtime against `transformers` and the floor.

    python -m specdec.bench.decode_speed --models smollm2-135m,qwen2.5-coder-0.5b \
        --dtypes float32,bfloat16 --new-tokens 128

For each model and dtype: decode tokens/s of specdec (`method ar`) and of
`transformers` `generate` on the same dequantised GGUF, same chat prompts, same
number of new tokens (EOS ignored), in the same process; the floor (weight
bytes read per step ÷ measured bandwidth); and where a specdec step's time goes
(linears, LM head, attention, other ops, Python overhead), from the profiler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a Python function that merges two sorted lists, with a docstring and tests.",
    "Explain in three paragraphs why the sky is blue.",
    "Summarise the plot of Romeo and Juliet for a ten-year-old.",
    "What are the differences between a process and a thread? Answer with a table.",
]


def ours(gen, prompt_ids, n: int) -> tuple[float, float]:
    from specdec.engine import Generation

    res = Generation()
    for _ in gen.engine.stream(prompt_ids, max_new_tokens=n, ignore_eos=True, result=res):
        pass
    s = res.stats
    return s.decode_tokens_per_s, s.prefill_s


def theirs(hf, prompt_ids, n: int) -> float:
    x = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        tn = time.perf_counter() - t
    assert out.shape[1] - x.shape[1] == n
    return (n - 1) / (tn - t1)


def step_split(gen, prompt_ids, steps: int = 16) -> dict[str, float]:
    """Milliseconds per decode step by kind of work, from top-level profiler events."""
    from torch.profiler import ProfilerActivity, profile

    target = gen.target
    target.reset()
    logits = target.forward(prompt_ids, logits_rows=slice(-1, None))
    pos = len(prompt_ids)
    vocab = gen.loaded.config.vocab_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            logits = target.forward([int(logits[-1].argmax())], positions=[pos])
            pos += 1
        wall = time.perf_counter() - t
    split = {"linears": 0.0, "lm_head": 0.0, "attention": 0.0, "other_ops": 0.0}
    for ev in prof.events():
        if ev.cpu_parent is not None:
            continue
        ms = ev.cpu_time_total / 1000
        shapes = ev.input_shapes or []
        if ev.name in ("aten::linear", "mkldnn::_linear_pointwise"):
            is_head = len(shapes) > 1 and shapes[1] and shapes[1][0] == vocab
            split["lm_head" if is_head else "linears"] += ms
        elif ev.name == "aten::scaled_dot_product_attention":
            split["attention"] += ms
        else:
            split["other_ops"] += ms
    out = {k: v / steps for k, v in split.items()}
    out["step"] = wall * 1000 / steps
    out["python_overhead"] = out["step"] - sum(split.values()) / steps
    return {k: round(v, 2) for k, v in out.items()}


def run(models, dtypes, n, hf: bool, out_path: Path | None) -> list[dict]:
    from specdec.api import Generator
    from specdec.bench.machine import machine_info

    info = machine_info()
    bw = info["bandwidth_gbs"]
    print(f"# machine: {json.dumps(info)}", file=sys.stderr)
    rows = []
    for name in models:
        for dtype in dtypes:
            gen = Generator.load(name, dtype=dtype, progress=False)
            prompts = [gen.prompt_ids(p) for p in PROMPTS]
            ours(gen, prompts[0], 8)  # warm-up
            nbytes = gen.loaded.weight_bytes
            row = {
                "model": name,
                "dtype": dtype,
                "weight_bytes_per_step": nbytes,
                "floor_ms": round(nbytes / bw / 1e6, 2),
                "floor_tokens_per_s": round(bw * 1e9 / nbytes, 1),
            }
            rates = [ours(gen, p, n)[0] for p in prompts]
            row["specdec_tokens_per_s"] = round(statistics.median(rates), 2)
            row["specdec_step_split_ms"] = step_split(gen, prompts[0])
            if hf:
                from transformers import AutoModelForCausalLM, GgufConfig

                path = Path(gen.loaded.source)
                del gen
                m = AutoModelForCausalLM.from_pretrained(
                    str(path.parent),
                    gguf_file=path.name,
                    dtype=getattr(torch, dtype),
                    # dense weights in the asked dtype, as specdec's (no packed GGUF kernels)
                    quantization_config=GgufConfig(dequantize=True),
                )
                m.eval()
                theirs(m, prompts[0], 8)
                row["transformers_tokens_per_s"] = round(
                    statistics.median(theirs(m, p, n) for p in prompts), 2
                )
                row["speedup_vs_transformers"] = round(
                    row["specdec_tokens_per_s"] / row["transformers_tokens_per_s"], 2
                )
                del m
            rows.append(row)
            print(json.dumps(row), flush=True)
    if out_path:
        out_path.write_text(json.dumps({"machine": info, "new_tokens": n, "rows": rows}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    run(args.models.split(","), args.dtypes.split(","), args.new_tokens, not args.no_hf, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
