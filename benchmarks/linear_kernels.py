"""Matmul kernels for one linear layer, side by side, at the row counts of a decode step
and of verifying a draft.

    python -m benchmarks.linear_kernels --shape 8960x1536 --rows 1,2,4,8,16,64
    python -m benchmarks.linear_kernels --quantised --rows 1,2,4,8,16,32,64

Float (default): ``F.linear`` against oneDNN-prepacked weights, per dtype.
``--quantised``: the weight-only kernels torch 2.13 ships for the CPU
(``_weight_int8pack_mm``, per-channel int8; ``_weight_int4pack_mm_for_cpu``,
group 32) against specdec's ``qgemm`` (int8 and int4 per 32 values, and the
GGUF Q4_K and Q6_K blocks, int8 activations), with bfloat16 prepacked as the
reference. Milliseconds per matmul (median), cycling through several weights
so they come from memory, not cache, as in a decode step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models.cpu_linear import PrepackedFloatLinear


def _median_ms(fn, copies: int, repeats: int = 15) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000 / copies


def _gguf_blocks(out_f: int, in_f: int, copies: int) -> dict[str, list]:
    """Real Q4_K and Q6_K matrices of this shape from Qwen2.5-Coder-1.5B's GGUF (its
    ffn_up / ffn_down; the gguf package cannot write K-quants), by block type."""
    import gguf
    import numpy as np

    from specdec.models.catalog import pull

    reader = gguf.GGUFReader(str(pull("qwen2.5-coder-1.5b", progress=False)))
    found: dict[str, list] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("Q4_K", "Q6_K") and (int(t.shape[1]), int(t.shape[0])) == (out_f, in_f):
            if len(found.setdefault(kind, [])) < copies:
                found[kind].append(np.asarray(t.data))
    return found


def quantised(out_f: int, in_f: int, rows: list[int], copies: int) -> None:
    """torch's weight-only CPU kernels against specdec's qgemm (see the module docstring)."""
    from specdec.kernels import packing
    from specdec.kernels.native import LinearKernel

    ws = [torch.randn(out_f, in_f) * 0.02 for _ in range(copies)]
    cands: dict[str, list] = {}
    lins = []
    for w in ws:
        lin = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
        lin.weight.copy_(w)
        lins.append(PrepackedFloatLinear(lin.to(torch.bfloat16)))
    cands["bf16 oneDNN"] = [(lambda x, p=p: p(x.to(torch.bfloat16))) for p in lins]
    int8 = []
    for w in ws:  # per output channel, symmetric
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        int8.append((q, scale))
    # torch's kernels take bfloat16 activations (float32 ones fall to a path ~15-30x slower)
    bf = torch.bfloat16
    cands["torch int8 (_weight_int8pack_mm)"] = [
        (lambda x, q=q, s=sc.to(bf): torch.ops.aten._weight_int8pack_mm(x.to(bf), q, s))
        for q, sc in int8
    ]
    int4 = []
    for w in ws:  # group 32, asymmetric, the layout torch's CPU int4 kernel wants
        g = w.reshape(out_f, in_f // 32, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_f, in_f), 1)
        zeros = lo + 8 * scale  # weight = (q - 8) * scale + zero
        sz = torch.stack([scale.t(), zeros.t()], dim=-1).contiguous().to(torch.bfloat16)
        int4.append((packed, sz))
    cands["torch int4 g32 (_weight_int4pack_mm_for_cpu)"] = [
        (lambda x, p=p, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(bf), p, 32, sz))
        for p, sz in int4
    ]
    for scheme in ("int8", "int4"):
        ks = [LinearKernel([packing.pack(packing.quantise_float(w, scheme), scheme)]) for w in ws]
        cands[f"specdec qgemm {scheme}"] = list(ks)
    for kind, raws in _gguf_blocks(out_f, in_f, copies).items():
        cands[f"specdec qgemm {kind} (the 1.5B's)"] = [
            LinearKernel([packing.pack(packing.split_gguf(raw, kind, out_f, in_f), kind)])
            for raw in raws
        ]
    for m in rows:
        x = torch.randn(m, in_f)
        row = {"shape": f"{out_f}x{in_f}", "rows": m}
        for name, fns in cands.items():
            row[name] = round(_median_ms(lambda x=x, fns=fns: [f(x) for f in fns], copies), 3)
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8960x1536", help="OUTxIN")
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--copies", type=int, default=6, help="weights cycled (exceed the cache)")
    ap.add_argument(
        "--quantised", action="store_true", help="torch's int8/int4 kernels against qgemm"
    )
    args = ap.parse_args(argv)
    out_f, in_f = (int(x) for x in args.shape.split("x"))
    if args.quantised:
        quantised(out_f, in_f, [int(r) for r in args.rows.split(",")], args.copies)
        return 0
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        lins = [
            nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
            for _ in range(args.copies)
        ]
        packed = [PrepackedFloatLinear(lin) for lin in lins]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, in_f).to(dtype)
            plain = _median_ms(
                lambda x=x, lins=lins: [F.linear(x, lin.weight) for lin in lins], args.copies
            )
            pk = _median_ms(lambda x=x, packed=packed: [p(x) for p in packed], args.copies)
            print(
                json.dumps(
                    {
                        "dtype": name,
                        "shape": args.shape,
                        "rows": m,
                        "f_linear_ms": round(plain, 3),
                        "prepacked_ms": round(pk, 3),
                        "speedup": round(plain / pk, 2),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
