"""Medusa heads in vLLM's Medusa checkpoint format (`vllm/model_executor/models/medusa.py`,
config class ``MedusaConfig``, ``model_type: medusa``).

vLLM's Medusa reads the target's final hidden states (after its last norm, as its models
return them) and gives head k ``num_hidden_layers`` blocks ``x + SiLU(W x + b)`` (the bias
when ``medusa_fc_bias``), then an LM head; with ``original_lm_head`` one LM head serves
every head, and with ``token_map`` (draft id -> target id) and ``truncated_vocab_size``
its rows are a draft vocabulary, the logits scattered back into the target's vocabulary.
That is our `MedusaHeads` exactly: the blocks are ours (``blocks.{k}.layers.{j}``), the
shared LM head is the target's own rows at the draft vocabulary (``lm_heads.0.weight``,
written already restricted to those rows, as vLLM would restrict it), ``token_map`` our
``d2t``.

The LM-head rows come from the target as specdec runs it: for a quantised GGUF the rows
its kernel computes, not the original float weights a vLLM deployment would load (the
difference is the quantisation's, at the head alone).

Hydra's heads read the tokens drafted before them through their own layer: no engine we
know of loads a public Hydra format, so Hydra heads are not exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specdec.models.eagle_head import head_rows, write_new_folder
from specdec.models.medusa_heads import MedusaHeads
from specdec.models.transformer import Transformer

WEIGHTS = "model.safetensors"


def export_medusa(
    heads: MedusaHeads,
    target: Transformer,
    folder: str | Path,
    *,
    top_k: int = 10,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``heads`` (trained for ``target``) as a vLLM Medusa checkpoint in ``folder``
    (new or empty), whole or not at all. ``top_k``: the ``topk`` its config suggests;
    ``dtype``: of the weights (float32: exactly the heads)."""
    heads.check_target(target)
    c = heads.config
    d = int(c.target["hidden_size"])
    vocab = int(c.target["vocab_size"])
    tensors: dict[str, torch.Tensor] = {}
    for k, block in enumerate(heads.blocks):
        for j, res in enumerate(block):
            tensors[f"blocks.{k}.layers.{j}.weight"] = res.linear.weight.detach().float()
            tensors[f"blocks.{k}.layers.{j}.bias"] = res.linear.bias.detach().float()
    tensors["lm_heads.0.weight"] = head_rows(target, heads.d2t)
    tensors = {k: t.to(dtype).contiguous() for k, t in tensors.items()}
    if c.draft_vocab < vocab:
        tensors["token_map"] = heads.d2t.to(torch.long).contiguous()
    config: dict[str, Any] = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": d,
        "vocab_size": vocab,
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "truncated_vocab_size": c.draft_vocab,
        "medusa_fc_bias": True,
        "original_lm_head": True,
        "topk": top_k,
        "max_paths": 64,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "specdec": {"target": c.target, "accuracy": c.accuracy, "training": c.training},
    }
    return write_new_folder(folder, tensors, json.dumps(config, indent=2), WEIGHTS)
