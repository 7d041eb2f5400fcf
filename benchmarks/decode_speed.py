"""Autoregressive decode speed of the native runtime against `transformers`, llama.cpp and
the floor, for each weight format.

    python -m benchmarks.decode_speed --models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b \
        --quants none,gguf,int8,int4 --dtypes bfloat16 --new-tokens 64 --out speed.json

For each model and weight format (``--quants``; ``none`` once per ``--dtypes`` entry,
quantised ones in float32): decode tokens/s of specdec (`method ar`), the floor (weight
bytes read per step ÷ measured bandwidth), the pass-cost curve k = 1..64 (`specdec
profile`'s), and the mean KL divergence of its next-token distributions from the
bfloat16 model's over a fixed text; then, on the same GGUF, same chat prompts, same
number of new tokens (EOS ignored), in the same process: `transformers` `generate`
in bfloat16 and llama.cpp's own decode loop (2 threads, its default settings), with
llama.cpp's pass-cost curve. Where specdec runs the GGUF's own blocks (``gguf``), it
and llama.cpp alternate prompt by prompt for ``--rounds`` rounds, and the row gains
``vs_llama_cpp``: the median of the paired ratios (this machine's speed drifts by
±15 % within minutes; alternating puts both at the same moments). For float models, where a specdec step's time goes
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


def kl_text_ids(gen, tokens: int = 256) -> list[int]:
    """A fixed text for the KL measurement: the first Spec-Bench summarisation question."""
    from specdec.bench.questions import load_dataset

    q = next(q for q in load_dataset("spec-bench").questions if q.category == "summarization")
    return gen.tokenizer.encode(q.turns[0])[:tokens]


def next_token_logprobs(gen, ids: list[int]) -> torch.Tensor:
    gen.target.reset()
    logits = gen.target.forward(ids, logits_rows=slice(None))
    gen.target.reset()
    return torch.log_softmax(logits.double(), dim=-1)


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(ref || other), in nats."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


class LlamaCppLoop:
    """llama.cpp's own greedy decode loop (low-level API, its default context settings,
    flash attention as llama.cpp picks it) on a GGUF: decode tokens/s on given prompt ids,
    and its pass-cost curve."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp as L

        from specdec.models.llamacpp_target import quiet_logs

        self.L = L
        quiet_logs(L)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(
            str(path).encode(), L.llama_model_default_params()
        )
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def _decode(self, tokens: list[int], pos0: int, every_row: bool) -> None:
        L = self.L
        b = L.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if every_row or i == len(tokens) - 1 else 0
        b.n_tokens = len(tokens)
        rc = L.llama_decode(self.ctx, b)
        L.llama_batch_free(b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _last_argmax(self) -> int:
        import numpy as np

        logits = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())

    def rate(self, ids: list[int], n: int) -> float:
        """Decode tokens/s of ``n`` greedy tokens after prefilling ``ids``."""
        self.L.llama_memory_clear(self.mem, True)
        self._decode(ids, 0, False)
        tok, pos = self._last_argmax(), len(ids)
        t = time.perf_counter()
        for _ in range(n):
            self._decode([tok], pos, False)
            tok, pos = self._last_argmax(), pos + 1
        return n / (time.perf_counter() - t)

    def curve(self) -> dict[int, float]:
        """Pass over k tokens on 256 cached ones, every row's logits (as verifying), best of 3."""
        import numpy as np

        self.L.llama_memory_clear(self.mem, True)
        ctx_ids = [int(x) for x in np.random.default_rng(0).integers(100, 20000, 256)]
        self._decode(ctx_ids, 0, False)
        curve = {}
        for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                self._decode(ctx_ids[:k], 256, True)
                best = min(best, time.perf_counter() - t)
                self.L.llama_memory_seq_rm(self.mem, 0, 256, -1)
            curve[k] = round(best * 1000, 3)
        return curve

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def run(
    models, dtypes, quants, n, hf: bool, llama: bool, out_path: Path | None, rounds: int = 3
) -> list[dict]:
    from specdec.api import Generator
    from specdec.bench.machine import machine_info
    from specdec.bench.profile import profile

    info = machine_info()
    bw = info["bandwidth_gbs"]
    print(f"# machine: {json.dumps(info)}", file=sys.stderr)
    rows = []
    for name in models:
        ref = None  # bfloat16 next-token log-probabilities on the KL text
        configs = [("none", d) for d in dtypes] if "none" in quants else []
        configs += [(q, "float32") for q in quants if q != "none"]
        reported_bf16 = ("none", "bfloat16") in configs
        if not reported_bf16:
            configs.insert(0, ("none", "bfloat16"))  # the KL reference, not reported
        source = prompts = None
        llama_row = None  # llama.cpp's, measured beside specdec's gguf when that runs
        for quant, dtype in configs:
            gen = Generator.load(name, dtype=dtype, quant=quant, progress=False)
            source = Path(gen.loaded.source)
            prompts = [gen.prompt_ids(p) for p in PROMPTS]
            logprobs = next_token_logprobs(gen, kl_text_ids(gen))
            if (quant, dtype) == ("none", "bfloat16"):
                ref = logprobs
                if not reported_bf16:
                    continue
            ours(gen, prompts[0], 8)  # warm-up
            nbytes = gen.loaded.weight_bytes
            row = {
                "model": name,
                "runtime": "specdec",
                "quant": gen.loaded.quant,
                "dtype": dtype,
                "weight_bytes_per_step": nbytes,
                "floor_ms": round(nbytes / bw / 1e6, 2),
                "floor_tokens_per_s": round(bw * 1e9 / nbytes, 1),
            }
            if llama and gen.loaded.quant == "gguf":
                # head to head on the same file: the two loops alternate prompt by prompt for
                # `rounds` rounds, so both see the same moments of a noisy machine
                loop = LlamaCppLoop(source, torch.get_num_threads())
                loop.rate(prompts[0], 8)  # warm-up
                rates, theirs_rates = [], []
                for _ in range(rounds):
                    for p in prompts:
                        rates.append(ours(gen, p, n)[0])
                        theirs_rates.append(loop.rate(p, n))
                ratios = [a / b for a, b in zip(rates, theirs_rates, strict=True)]
                row["vs_llama_cpp"] = round(statistics.median(ratios), 3)
                llama_row = {"model": name, "runtime": "llama.cpp", "quant": "gguf"}
                llama_row["tokens_per_s"] = round(statistics.median(theirs_rates), 2)
                llama_row["pass_ms"] = loop.curve()
                loop.close()
            else:
                rates = [ours(gen, p, n)[0] for p in prompts]
            row["tokens_per_s"] = round(statistics.median(rates), 2)
            row["mean_kl_to_bf16"] = round(mean_kl(ref, logprobs), 5)
            prof = profile(gen)
            row["pass_ms"] = prof["pass_ms"]
            row["over_roofline"] = prof["over_roofline"]
            if gen.loaded.quant == "none":
                row["step_split_ms"] = step_split(gen, prompts[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
            del gen
        if hf:
            from transformers import AutoModelForCausalLM, GgufConfig

            m = AutoModelForCausalLM.from_pretrained(
                str(source.parent),
                gguf_file=source.name,
                dtype=torch.bfloat16,
                # dense weights, as transformers runs a GGUF (no packed GGUF kernels)
                quantization_config=GgufConfig(dequantize=True),
            )
            m.eval()
            theirs(m, prompts[0], 8)
            rate = statistics.median(theirs(m, p, n) for p in prompts)
            row = {"model": name, "runtime": "transformers", "dtype": "bfloat16"}
            row["tokens_per_s"] = round(rate, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del m
        if llama:
            if llama_row is None:
                loop = LlamaCppLoop(source, torch.get_num_threads())
                loop.rate(prompts[0], 8)  # warm-up
                rates = [loop.rate(p, n) for p in prompts]
                llama_row = {"model": name, "runtime": "llama.cpp", "quant": "gguf"}
                llama_row["tokens_per_s"] = round(statistics.median(rates), 2)
                llama_row["pass_ms"] = loop.curve()
                loop.close()
            rows.append(llama_row)
            print(json.dumps(llama_row), flush=True)
    if out_path:
        out_path.write_text(json.dumps({"machine": info, "new_tokens": n, "rows": rows}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models",
        default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b",
        help="comma-separated model names (`specdec models`)",
    )
    ap.add_argument("--dtypes", default="bfloat16", help="dtypes of the float (--quants none) runs")
    ap.add_argument(
        "--quants", default="none,gguf,int8,int4", help="weight formats to run (see --quant)"
    )
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over the prompts when specdec's gguf and llama.cpp alternate (default 3)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        ap.error("--rounds and --new-tokens must be at least 1")
    from specdec.bench.runners import llama_cpp_available

    llama = not args.no_llama_cpp and llama_cpp_available() is None
    if not args.no_llama_cpp and not llama:
        print(f"# llama.cpp skipped: {llama_cpp_available()}", file=sys.stderr)
    run(
        args.models.split(","),
        args.dtypes.split(","),
        args.quants.split(","),
        args.new_tokens,
        not args.no_hf,
        llama,
        args.out,
        args.rounds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
