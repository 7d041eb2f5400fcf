"""Parity of the native runtime with `transformers` on the same GGUF file.

    python -m benchmarks.parity --model qwen2.5-coder-0.5b

Loads the file twice (native, and `transformers` with `gguf_file=`), compares
the logits of a fixed 256-token text in float32, and compares 64 greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PARITY_TEXT = """\
def merge_sorted(left: list[int], right: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists into one sorted list in linear time.\"\"\"
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    out.extend(left[i:])
    out.extend(right[j:])
    return out


Speculative decoding lets a small draft model propose several tokens that a large
target model then checks in a single forward pass. Every accepted token saves one
expensive step, and the output is provably the same as the target's own, because a
token is only kept when the target would have produced it. On a CPU the cost of one
step is set by how many bytes of weights must be read from memory, so verifying a few
tokens at once is nearly free: the weights are read once for all of them.

class LRUCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value
        return value
"""


def check_parity(model: str, *, n_tokens: int = 256, greedy_tokens: int = 64) -> dict:
    from transformers import AutoModelForCausalLM

    from specdec.models.loading import load_model

    native = load_model(model, dtype="float32", progress=False)
    path = Path(native.source)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    hf.eval()
    ids = native.tokenizer.encode(PARITY_TEXT)[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"parity text is only {len(ids)} tokens")
    x = torch.tensor(ids)
    ours = native.model(x, torch.arange(len(ids)), native.model.new_cache())
    with torch.no_grad():
        theirs = hf(x[None]).logits[0].float()
    diff = (ours - theirs).abs()
    argmax_equal = bool((ours.argmax(-1) == theirs.argmax(-1)).all())

    prompt = native.tokenizer.encode_chat(
        [
            {
                "role": "user",
                "content": "Write a Python function that checks whether a number is prime.",
            }
        ]
    )
    from specdec.engine import Engine, Generation
    from specdec.models.target import NativeTarget

    res = Generation()
    for _ in Engine(NativeTarget(native.model), native.tokenizer).stream(
        prompt, max_new_tokens=greedy_tokens, result=res
    ):
        pass
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=len(res.token_ids),
            do_sample=False,
            eos_token_id=sorted(native.tokenizer.eos_token_ids),
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    return {
        "model": model,
        "tokens": len(ids),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "logit_scale": float(theirs.abs().max()),
        "argmax_equal_every_position": argmax_equal,
        "greedy_tokens": len(res.token_ids),
        "greedy_identical": res.token_ids == ref,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    args = ap.parse_args(argv)
    for m in args.model:
        print(json.dumps(check_parity(m)))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
