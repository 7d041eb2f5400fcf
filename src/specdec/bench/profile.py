"""`specdec profile`: a model's decode step against this machine's limits.

Reports the memory bandwidth (measured once per machine and cached), the weight bytes
one decode step reads and the floor they imply (bytes / bandwidth), the measured step,
and the cost of one pass over k = 1 ... 64 tokens on 256 cached tokens: the same cached
curve the engine sizes its draft trees by; and a prompt's prefill over 512 tokens. For
quantised models it adds the roofline of each pass, max(bytes / bandwidth, k x
multiply-adds / peak int8 rate), with the
peak measured by the kernel library's vpdpbusd micro-benchmark; the roofline leaves
out the cost of unpacking weights, so it is a bound no kernel reaches. Beside it, the
same bound at the rate that micro-benchmark reaches with the kernel's own float work
mixed in (per 32 inputs of a row: 8 vpdpbusd and 2-4 float multiply-adds that take the
same pipes, by weight format): what the kernel's instruction mix allows.
"""

from __future__ import annotations

from typing import Any

import torch


def macs_per_token(model: torch.nn.Module) -> int:
    """Multiply-adds of the linears (LM head included) for one token."""
    from specdec.models.cpu_linear import PrepackedFloatLinear
    from specdec.models.quant_linear import QuantLinear

    linears = (QuantLinear, PrepackedFloatLinear, torch.nn.Linear)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, linears))


def float_ops_per_8(w: Any) -> int:
    """Float multiply-adds the kernel runs beside every 8 vpdpbusd for packed weight ``w``:
    per group, scale x activation scale and the sum, plus the offset where it is a real
    minimum (Q4_K, Q4_1, int4); 16-value groups (Q6_K) do it twice per 32 inputs."""
    return (2 + (0 if w.offset else 1)) * (32 // w.group)


def mix_peak_gmacs(model: torch.nn.Module) -> float:
    """The int8 multiply-add rate the kernel's instruction mix allows on this model: each
    quantised matrix's multiply-adds at the measured rate for its float work."""
    from specdec.kernels.native import vnni_peak_gmacs
    from specdec.models.quant_linear import QuantLinear

    macs: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for w in m.kernel.parts:
                f = min(float_ops_per_8(w), 4)
                macs[f] = macs.get(f, 0) + w.n * w.k
    rates = {f: vnni_peak_gmacs(float_ops_per_8=f) for f in macs}
    if not macs or min(rates.values()) <= 0:
        return 0.0
    return sum(macs.values()) / sum(n / rates[f] for f, n in macs.items())


def linears_ms(model: torch.nn.Module, rows: int = 1, repeats: int = 5) -> float:
    """Milliseconds of every quantised matmul of one pass over ``rows`` tokens, run alone in
    model order on random inputs (the best of ``repeats``): the step minus this is what
    the rest of the step (norms, RoPE, attention, glue) costs."""
    import time

    from specdec.models.quant_linear import QuantLinear

    kernels = [m.kernel for m in model.modules() if isinstance(m, QuantLinear)]
    inputs = {k.k: torch.randn(rows, k.k) for k in kernels}
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for k in kernels:
            k(inputs[k.k])
        best = min(best, time.perf_counter() - t)
    return best * 1e3


PREFILL_TOKENS = 512


def prefill_ms(model: torch.nn.Module, n: int = PREFILL_TOKENS, repeats: int = 2) -> float:
    """Milliseconds of a prompt's pass over ``n`` random tokens on an empty cache, logits for
    the last row only (what a request's prefill does); the best of ``repeats``."""
    import time

    n = min(n, model.config.max_position_embeddings)
    tokens = torch.randint(
        0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)
    )
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(capacity=n)
        t = time.perf_counter()
        model(tokens, torch.arange(n), cache, logits_rows=slice(-1, None))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def profile(gen: Any, refresh: bool = False) -> dict[str, Any]:
    """The profile of a loaded `specdec.api.Generator` (see the module docstring)."""
    from specdec.bench.machine import machine_info

    bandwidth = machine_info()["bandwidth_gbs"]
    loaded = getattr(gen, "loaded", None)
    curve = gen.pass_cost(refresh=refresh)
    step = curve(1)
    out: dict[str, Any] = {
        "model": gen.name,
        "backend": "native" if loaded is not None else "hf",
        "quant": loaded.quant if loaded is not None else "none",
        "dtype": str(loaded.model.dtype).removeprefix("torch.")
        if loaded is not None
        else gen.dtype,
        "kernel": None,
        "bandwidth_gbs": bandwidth,
        "weight_bytes_per_step": None,
        "floor_ms": None,
        "step_ms": round(step, 3),
        "pass_ms": {k: round(v, 3) for k, v in curve.ms.items()},
        "prefill_tokens": None,
        "prefill_ms": None,
        "pass_relative": {k: round(v, 3) for k, v in curve.relative().items()},
        "linears_ms": None,
        "other_ms": None,
        "macs_per_token": None,
        "int8_peak_gmacs": None,
        "int8_mix_gmacs": None,
        "roofline_ms": None,
        "over_roofline": None,
        "over_mix_roofline": None,
    }
    if loaded is None:
        return out
    nbytes = loaded.weight_bytes
    floor = nbytes / (bandwidth * 1e9) * 1e3
    n = min(PREFILL_TOKENS, loaded.model.config.max_position_embeddings)
    out.update(prefill_tokens=n, prefill_ms=round(prefill_ms(loaded.model, n), 3))
    out.update(weight_bytes_per_step=nbytes, floor_ms=round(floor, 3))
    if loaded.quant != "none":
        from specdec.kernels.native import path, vnni_peak_gmacs

        macs = macs_per_token(loaded.model)
        peak = vnni_peak_gmacs()
        mix = mix_peak_gmacs(loaded.model)
        lin = linears_ms(loaded.model)
        out.update(kernel=path(), macs_per_token=macs, int8_peak_gmacs=round(peak, 1))
        out.update(int8_mix_gmacs=round(mix, 1) if mix > 0 else None)
        out.update(linears_ms=round(lin, 3), other_ms=round(step - lin, 3))
        if peak > 0:
            roof = {k: max(floor, k * macs / (peak * 1e9) * 1e3) for k in curve.ms}
            out["roofline_ms"] = {k: round(v, 3) for k, v in roof.items()}
            out["over_roofline"] = {k: round(curve.ms[k] / v, 3) for k, v in roof.items()}
        if mix > 0:
            out["over_mix_roofline"] = {
                k: round(ms / max(floor, k * macs / (mix * 1e9) * 1e3), 3)
                for k, ms in curve.ms.items()
            }
    return out


def render(p: dict[str, Any]) -> str:
    """The profile as a short text report."""
    lines = [
        f"model {p['model']} ({p['backend']} backend): weights {p['quant']}, "
        f"{p['dtype']} around them" + (f", kernel {p['kernel']}" if p["kernel"] else ""),
        f"memory bandwidth     {p['bandwidth_gbs']:.1f} GB/s (measured once on this machine, cached)",
    ]
    if p["floor_ms"] is not None:
        lines.append(
            f"weights per step     {p['weight_bytes_per_step'] / 1e6:.0f} MB -> floor "
            f"{p['floor_ms']:.1f} ms"
        )
    step = f"decode step          {p['step_ms']:.1f} ms"
    if p["floor_ms"]:
        step += f" ({p['step_ms'] / p['floor_ms']:.2f}x the floor)"
    lines.append(step)
    if p["linears_ms"] is not None:
        lines.append(
            f"  of which matmuls   {p['linears_ms']:.1f} ms alone; the rest (norms, RoPE, "
            f"attention, glue) ~{p['other_ms']:.1f} ms"
        )
    if p.get("prefill_ms"):
        lines.append(
            f"prefill              {p['prefill_tokens']} tokens in {p['prefill_ms']:.0f} ms "
            f"({p['prefill_tokens'] / p['prefill_ms'] * 1e3:.0f} tokens/s)"
        )
    if p["int8_peak_gmacs"]:
        lines.append(
            f"int8 peak            {p['int8_peak_gmacs']:.0f} G multiply-adds/s; "
            f"{p['macs_per_token'] / 1e9:.2f} G per token"
        )
    if p.get("int8_mix_gmacs"):
        lines.append(
            f"  with the kernel's float work {p['int8_mix_gmacs']:.0f} G/s "
            f"({p['int8_mix_gmacs'] / p['int8_peak_gmacs']:.0%} of the peak; the x mix column)"
        )
    lines.append("pass over k tokens (256 cached):")
    head = "    k        ms   x k=1"
    if p["roofline_ms"]:
        head += "  roofline ms  x roofline"
    if p.get("over_mix_roofline"):
        head += "  x mix"
    lines.append(head)
    for k, ms in p["pass_ms"].items():
        row = f"  {k:>3}  {ms:8.1f}  {p['pass_relative'][k]:6.2f}"
        if p["roofline_ms"]:
            row += f"  {p['roofline_ms'][k]:11.1f}  {p['over_roofline'][k]:9.2f}"
        if p.get("over_mix_roofline"):
            row += f"  {p['over_mix_roofline'][k]:5.2f}"
        lines.append(row)
    return "\n".join(lines)
