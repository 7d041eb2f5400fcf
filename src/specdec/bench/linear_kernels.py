"""Matmul kernels for one linear layer: ``F.linear`` against oneDNN-prepacked weights.

    python -m specdec.bench.linear_kernels --shape 8960x1536 --rows 1,2,4,8,16,64

Milliseconds per matmul (median), cycling through several weights so they come
from memory, not cache, as in a decode step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from specdec.models.cpu_linear import PackedLinear


def _median_ms(fn, copies: int, repeats: int = 15) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000 / copies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8960x1536", help="OUTxIN")
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--copies", type=int, default=6, help="weights cycled (exceed the cache)")
    args = ap.parse_args(argv)
    out_f, in_f = (int(x) for x in args.shape.split("x"))
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        lins = [
            nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
            for _ in range(args.copies)
        ]
        packed = [PackedLinear(lin) for lin in lins]
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
