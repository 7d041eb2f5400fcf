"""EAGLE-3 heads in the `speculators` checkpoint format, which vLLM loads natively.

A speculators EAGLE-3 checkpoint (vllm-project/speculators, ``Eagle3Speculator``) is a
folder with ``config.json`` (``speculators_model_type: eagle3``, a Llama-style
``transformer_layer_config`` for the one decoder layer, ``draft_vocab_size``,
``eagle_aux_hidden_state_layer_ids``, ``norm_before_residual``, and ``speculators_config``
naming the verifier) and safetensors weights: ``fc``, ``layers.0.*`` (q/k/v projections
reading 2·hidden, ``hidden_norm``), ``norm``, ``lm_head``, and the vocabulary maps ``d2t``
(draft id → target id − draft id) and ``t2d`` (a mask over the target's vocabulary).
The embedding is left out: vLLM then shares the target's, as we do.

`export_head` writes one of our version-3 heads so; `import_head` reads one back (ours or
one trained elsewhere for a model we run) into an `EagleHead`, refusing with one line
the variants our head does not compute (biases, extra norms, several layers).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from specdec.models.config import ModelConfig
from specdec.models.eagle_head import EagleHead, HeadConfig, HeadError, write_new_folder

SPECULATORS_VERSION = "0.3.0"  # the format's version our files follow
WEIGHTS = "model.safetensors"

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
ARCHITECTURES.update(mistral="MistralForCausalLM")


def is_speculators(folder: str | Path) -> bool:
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "speculators_model_type" in data


def _layer_config(head: EagleHead) -> dict[str, Any]:
    c = head.config.layer
    out: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
    if c.rope_scaling:
        out["rope_scaling"] = dict(c.rope_scaling)
    return out


def export_head(
    head: EagleHead,
    folder: str | Path,
    verifier: str,
    tokens: int = 3,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``head`` (version 3) as a speculators checkpoint in ``folder``, whole or not
    at all. ``verifier``: the target's name or path as vLLM should know it; ``tokens``:
    the speculative tokens its proposal config suggests; ``dtype``: of the weights
    (float32: exactly the head; bfloat16: half the bytes, as such checkpoints usually are)."""
    if head.version != 3:
        raise HeadError("only EAGLE-3 heads have a speculators format (train one with --version 3)")
    folder = Path(folder)
    c = head.config
    d = c.layer.hidden_size
    n_q, n_kv = c.layer.num_heads * c.layer.head_dim, c.layer.num_kv_heads * c.layer.head_dim
    w = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    q, k, v = w["layer.attn.wqkv.weight"].split([n_q, n_kv, n_kv])
    gate, up = w["layer.ffn.w13.weight"].split(c.layer.intermediate_size)
    vocab = int(c.target["vocab_size"])
    ids = head.d2t.cpu()
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    tensors = {
        "fc.weight": w["fc.weight"],
        "layers.0.input_layernorm.weight": w["layer.attn_norm.weight"],
        "layers.0.hidden_norm.weight": w["hidden_norm.weight"],
        "layers.0.self_attn.q_proj.weight": q,
        "layers.0.self_attn.k_proj.weight": k,
        "layers.0.self_attn.v_proj.weight": v,
        "layers.0.self_attn.o_proj.weight": w["layer.attn.wo.weight"],
        "layers.0.post_attention_layernorm.weight": w["layer.ffn_norm.weight"],
        "layers.0.mlp.gate_proj.weight": gate,
        "layers.0.mlp.up_proj.weight": up,
        "layers.0.mlp.down_proj.weight": w["layer.ffn.w2.weight"],
        "norm.weight": w["norm.weight"],
        "lm_head.weight": w["lm_head.weight"],
        "d2t": ids - torch.arange(ids.numel()),
        "t2d": t2d,
    }
    tensors = {
        k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in tensors.items()
    }
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": _layer_config(head),
        "draft_vocab_size": c.draft_vocab,
        "norm_before_residual": c.norm_before_residual,
        "target_hidden_size": d,
        "eagle_aux_hidden_state_layer_ids": list(c.feature_layers),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": verifier,
                "architectures": [ARCHITECTURES.get(c.layer.architecture, "LlamaForCausalLM")],
            },
        },
        "specdec": {"target": c.target, "training": c.training},
    }
    return write_new_folder(folder, tensors, json.dumps(config, indent=2), WEIGHTS)


def import_head(folder: str | Path, target_name: str = "") -> EagleHead:
    """An `EagleHead` from the speculators EAGLE-3 checkpoint in ``folder``; its target's
    facts (hidden size, vocabulary, layer count) come from the checkpoint, and are checked
    against the model it drafts for when it is built (`EagleHead.check_target`)."""
    folder = Path(folder)
    where = str(folder / "config.json")
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HeadError(f"{where}: unreadable ({e})") from None
    kind = data.get("speculators_model_type")
    if kind != "eagle3":
        raise HeadError(f"{where}: a speculators {kind!r} checkpoint, not an EAGLE-3 one")
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if data.get(flag):
            raise HeadError(f"{where}: {flag} is not supported")
    lc = data.get("transformer_layer_config") or {}
    if int(lc.get("num_hidden_layers", 1)) != 1:
        raise HeadError(f"{where}: {lc.get('num_hidden_layers')} decoder layers; one is supported")
    if lc.get("attention_bias") or lc.get("mlp_bias") or lc.get("qkv_bias"):
        raise HeadError(f"{where}: biases in the decoder layer are not supported")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HeadError(f"{folder}: no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            tensors.update(load_file(str(f)))
    except (SafetensorError, OSError, ValueError) as e:
        raise HeadError(f"{folder}: damaged weights ({e})") from None
    try:
        d = int(lc["hidden_size"])
        heads = int(lc["num_attention_heads"])
        layer = ModelConfig(
            architecture="llama",
            vocab_size=int(lc["vocab_size"]),
            hidden_size=d,
            intermediate_size=int(lc["intermediate_size"]),
            num_layers=1,
            num_heads=heads,
            num_kv_heads=int(lc.get("num_key_value_heads", heads)),
            head_dim=int(lc.get("head_dim") or d // heads),
            rms_norm_eps=float(lc.get("rms_norm_eps", 1e-6)),
            rope_theta=float(lc.get("rope_theta", 10000.0)),
            max_position_embeddings=int(lc.get("max_position_embeddings", 4096)),
            rope_scaling=lc.get("rope_scaling"),
        )
        draft_vocab = int(data["draft_vocab_size"])
        ids = list(data.get("eagle_aux_hidden_state_layer_ids") or ())
        if "t2d" in tensors:
            vocab = int(tensors["t2d"].numel())
        else:
            vocab = layer.vocab_size
        if "d2t" in tensors:
            d2t = tensors["d2t"].to(torch.long) + torch.arange(draft_vocab)
        else:
            d2t = torch.arange(draft_vocab)
        ours = data.get("specdec") or {}
        target = dict(ours.get("target") or {})
        target.update(hidden_size=int(data.get("target_hidden_size") or d), vocab_size=vocab)
        if not ids:
            raise HeadError(f"{where}: eagle_aux_hidden_state_layer_ids is missing")
        target.setdefault("num_layers", None)  # made elsewhere: its layer ids bound it
        verifier = (data.get("speculators_config") or {}).get("verifier") or {}
        target.setdefault("name", target_name or verifier.get("name_or_path") or "its verifier")
        config = HeadConfig(
            replace(layer, vocab_size=vocab),
            target,
            draft_vocab,
            version=3,
            training=dict(ours.get("training") or {}),
            feature_layers=tuple(int(i) for i in ids),
            norm_before_residual=bool(data.get("norm_before_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise HeadError(f"{where}: not an EAGLE-3 config ({e})") from None
    head = EagleHead(config)
    n_q, n_kv = heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
    try:
        state = {
            "fc.weight": tensors["fc.weight"],
            "layer.attn_norm.weight": tensors["layers.0.input_layernorm.weight"],
            "hidden_norm.weight": tensors["layers.0.hidden_norm.weight"],
            "layer.attn.wqkv.weight": torch.cat(
                [tensors[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
            ),
            "layer.attn.wo.weight": tensors["layers.0.self_attn.o_proj.weight"],
            "layer.ffn_norm.weight": tensors["layers.0.post_attention_layernorm.weight"],
            "layer.ffn.w13.weight": torch.cat(
                [tensors[f"layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")]
            ),
            "layer.ffn.w2.weight": tensors["layers.0.mlp.down_proj.weight"],
            "norm.weight": tensors["norm.weight"],
            "lm_head.weight": tensors["lm_head.weight"],
            "d2t": d2t,
        }
    except KeyError as e:
        raise HeadError(f"{folder}: weight {e} is missing") from None
    expected = head.state_dict()
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise HeadError(
                f"{folder}: {key} is {tuple(value.shape)}, its config says "
                f"{tuple(expected[key].shape)}"
            )
    if state["layer.attn.wqkv.weight"].shape[0] != n_q + 2 * n_kv:
        raise HeadError(f"{folder}: q/k/v projections do not match the attention heads")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    if bool((d2t[1:] <= d2t[:-1]).any()) or int(d2t.min()) < 0 or int(d2t.max()) >= vocab:
        raise HeadError(f"{folder}: d2t does not map the draft vocabulary to increasing ids")
    return head.to(torch.float32)
