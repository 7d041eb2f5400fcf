"""What one drafted token of an EAGLE head costs, as a fraction of the target's step.

    python -m benchmarks.eagle_cost --model qwen2.5-coder-1.5b --quants int4,int8,none
    python -m benchmarks.eagle_cost --version 3 --untrained 32768

Loads the model (its default weights) and the head `specdec train eagle` made for it
(``--untrained N``: a fresh head of ``--version`` drafting among the first N token ids:
the cost does not depend on the weights), then times, on 256
cached tokens, the target's one-token pass and the head's one-token pass (its fc, its
layer, the LM head over the draft vocabulary, the -inf fill of the rest) in each of the
head's weight formats, best of ``--repeats`` rounds of 20 passes each, alternating, so
that the host's drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specdec.api import Generator
from specdec.models.eagle_head import EagleHead, load_head
from specdec.speculation.drafters.eagle import HeadDraft, default_head


def per_pass(forward, rollback, n: int = 20) -> float:
    t = time.perf_counter()
    for _ in range(n):
        forward()
        rollback()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--head", default=None, help="head folder (default: the model's trained head)")
    ap.add_argument("--version", default="auto", choices=("auto", "1", "3"))
    ap.add_argument("--untrained", type=int, default=0, metavar="N",
                    help="time a fresh head with an N-token draft vocabulary instead")  # fmt: skip
    ap.add_argument("--quants", default="int4,int8,none")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    gen = Generator.load(args.model, progress=False)
    model = gen.target.model
    if args.untrained:
        version = 3 if args.version == "3" else 1
        head = EagleHead.for_target(
            model, args.model, torch.arange(args.untrained), version=version
        )
    else:
        head = load_head(args.head or default_head(args.model, args.version))
    width = model.config.hidden_size * len(head.config.feature_layers)
    context = torch.randint(0, model.config.vocab_size, (257,)).tolist()
    gen.target.reset()
    gen.target.forward(context[:256], logits_rows=slice(-1, None))
    drafts = {}
    for quant in args.quants.split(","):
        d = HeadDraft(head, model, quant)
        d.add_features(torch.randn(256, width))
        d.forward(context[:256], logits_rows=slice(-1, None))
        drafts[quant] = d
    best = {"target": float("inf"), **{q: float("inf") for q in drafts}}
    for _ in range(args.repeats):
        t = per_pass(lambda: gen.target.forward([context[256]]), lambda: gen.target.rollback(1))
        best["target"] = min(best["target"], t)
        for q, d in drafts.items():
            t = per_pass(lambda d=d: d.forward([context[256]]), lambda d=d: d.rollback(1))
            best[q] = min(best[q], t)
    out = {
        "model": args.model,
        "version": head.version,
        "draft_vocab": head.config.draft_vocab,
        "target_ms": round(best["target"] * 1e3, 3),
        "head_ms": {q: round(best[q] * 1e3, 3) for q in drafts},
        "fraction_of_a_step": {q: round(best[q] / best["target"], 3) for q in drafts},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
