"""Draft models trained here: a float copy of a model to train (maybe cut to its first
layers, FastDraft's "smaller than any packaged model"), its forward over a whole
sequence with autograd, and its files.

A trained draft is written as a Hugging Face folder (``config.json``, ``model.safetensors``
in transformers' names, the tokenizer's files, and ``specdec-draft.json``: how it was
made): `specdec.models.loading` loads it as any such folder (``--draft PATH``), and so
does transformers, the parity reference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import replace_folder
from specdec.models.hydra_heads import causal_block
from specdec.models.transformer import Transformer

DRAFT_INFO = "specdec-draft.json"
# what a tokenizer folder holds besides weights (copied beside a trained draft's)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def trainable_copy(
    model: Transformer, layers: int | None = None, dtype: torch.dtype = torch.float32
) -> Transformer:
    """A copy of ``model`` in ``dtype`` with gradients on, keeping its first ``layers`` decoder
    layers (None: all), its embedding, final norm and LM head. ``model`` must hold its
    linears as plain float weights (loaded with ``pack=False`` and ``quant="none"``)."""
    cfg = model.config
    keep = cfg.num_layers if layers is None else layers
    if not 1 <= keep <= cfg.num_layers:
        raise InvalidRequestError(f"--layers must be 1 .. {cfg.num_layers}, got {keep}")
    copy = Transformer(replace(cfg, num_layers=keep))
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers.") and int(key.split(".")[1]) >= keep:
            continue
        state[key] = value.detach().to(dtype).clone()
    missing = sorted(set(copy.state_dict()) - set(state))
    if missing:  # packed or quantised linears keep no float weight
        raise InvalidRequestError(
            f"the model holds no float weights for {missing[0]} (and {len(missing) - 1} "
            "more): load it unpacked, with --quant none, to train it"
        )
    copy.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        copy.lm_head.weight = copy.embed.weight
    return copy.to(dtype).requires_grad_(True)


def sequence_logits(
    model: Transformer, tokens: torch.Tensor, rows: torch.Tensor | slice | None = None
) -> torch.Tensor:
    """The model over one sequence (``tokens`` (n,), positions 0 .. n - 1), causally, with
    autograd: its logits at ``rows`` (None: every position), (rows, vocab); what its
    cached passes compute."""
    h = model.embed(tokens)
    for block in model.layers:
        h = causal_block(block, h, model.config)
    if rows is not None:
        h = h[rows]
    return model.lm_head(model.norm(h))


def hf_config(model: Transformer) -> dict[str, Any]:
    """The model's config.json as transformers writes it for its architecture."""
    c = model.config
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[c.architecture]],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": c.attention_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if c.rope_scaling is not None:
        out["rope_scaling"] = c.rope_scaling
    return out


def hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights in transformers' names (fused projections split), float32."""
    c = model.config
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        parts = sd[src + "attn.wqkv.weight"].split([q, kv, kv])
        for name, w in zip("qkv", parts, strict=True):
            out[f"{dst}self_attn.{name}_proj.weight"] = w.contiguous()
        if c.attention_bias:
            parts = sd[src + "attn.wqkv.bias"].split([q, kv, kv])
            for name, b in zip("qkv", parts, strict=True):
                out[f"{dst}self_attn.{name}_proj.bias"] = b.contiguous()
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.wo.weight"]
        gate, up = sd[src + "ffn.w13.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"] = gate.contiguous()
        out[dst + "mlp.up_proj.weight"] = up.contiguous()
        out[dst + "mlp.down_proj.weight"] = sd[src + "ffn.w2.weight"]
    return out


def save_draft(
    model: Transformer, tokenizer_folder: str | Path, out: str | Path, info: dict[str, Any]
) -> Path:
    """``model`` as a Hugging Face folder at ``out`` with the tokenizer files of
    ``tokenizer_folder`` and ``info`` (how it was made) in specdec-draft.json, written
    whole or not at all (an existing folder is replaced)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".draft-", dir=out.parent))
    try:
        save_file(hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model), indent=1))
        copied = 0
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_folder) / name).is_file():
                shutil.copyfile(Path(tokenizer_folder) / name, tmp / name)
                copied += name == "tokenizer.json"
        if not copied:
            raise InvalidRequestError(f"{tokenizer_folder}: no tokenizer.json to copy")
        (tmp / DRAFT_INFO).write_text(json.dumps(info, indent=1))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
