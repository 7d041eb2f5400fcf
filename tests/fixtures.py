"""Tiny models in real file formats, written in-process for the tests.

- `tiny_hf_model`: a random `transformers` Llama / Qwen2 model (float64, 3 layers, vocab 96);
- `write_tokenizer`: a byte-level BPE tokenizer over single characters plus a few merges and the
  ChatML special tokens, as `tokenizer.json` + `tokenizer_config.json`;
- `save_hf_folder`: a safetensors folder as `save_pretrained` writes it, with that tokenizer;
- `write_gguf`: a GGUF file written with `gguf.GGUFWriter` the way llama.cpp's
  `convert_hf_to_gguf.py` writes one (key names, tensor names, the q/k row permutation of
  llama-type models, a gpt2-style tokenizer in the metadata), in F32, Q8_0 or Q4_0;
- `corrupt_copies`: a truncated and a bad-magic copy of a file.

Import as ``from fixtures import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 96
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}
ROPE_THETA = 10000.0
CONTEXT = TINY["max_position_embeddings"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Merges (in rank order) over the byte-level alphabet; each result is a token of its own.
MERGES = (
    ("h", "e"),
    ("t", "he"),
    ("Ġ", "the"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("a", "n"),
    ("r", "e"),
    ("Ġ", "s"),
    ("e", "s"),
    ("Ġ", "c"),
    ("in", "g"),
    ("o", "r"),
    ("Ġ", "w"),
)
_PUNCT = ".,!?:;'\"-()_/="


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (byte-level BPE spells tokens in it)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


def vocab_tokens(vocab: int = VOCAB) -> list[str]:
    """The token strings by id: special tokens, characters, merge results, then padding."""
    spell = _bytes_to_unicode()
    chars = " \n" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789"
    chars += _PUNCT
    tokens = list(SPECIAL_TOKENS) + [spell[b] for b in chars.encode()]
    tokens += [a + b for a, b in MERGES]
    if len(tokens) > vocab:
        raise ValueError(f"the tiny tokenizer needs at least {len(tokens)} ids, got vocab={vocab}")
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    assert len(set(tokens)) == len(tokens)
    return tokens


# --------------------------------------------------------------------------- models
def tiny_hf_model(arch: str = "llama", seed: int = 0, tie: bool = False, **overrides):
    """A random Llama / Qwen2 causal LM in float64 with non-trivial weights (std 0.2).

    Norm weights are 1 + N(0, 0.2), every other parameter (q/k/v biases of qwen2 included) N(0, 0.2).
    ``overrides`` go to the config (e.g. ``rope_theta=5e5``).
    """
    import transformers

    kw = {
        **TINY,
        "tie_word_embeddings": tie,
        "rope_theta": ROPE_THETA,
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": None,
        **overrides,
    }
    theta = kw.pop("rope_theta")
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    if arch == "llama":
        config = transformers.LlamaConfig(**kw)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    config._attn_implementation = "sdpa"  # eager softmaxes in float32
    model = cls(config).to(torch.float64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2
            p.copy_(1.0 + noise if "norm" in name else noise)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _rms_norm_in_input_dtype.__get__(module)
    return model


def _rms_norm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm, minus its round trip through float32.

    transformers normalises in float32 whatever the model dtype, so a "float64" model is only
    float32-exact; the native runtime keeps float64 in float64. For float32 both are identical.
    """
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) of the HF model on one sequence of token ids."""
    with torch.no_grad():
        return model(tokens[None]).logits[0]


def hf_arch(model) -> str:
    return model.config.model_type


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(vocab: int = VOCAB):
    """The tiny byte-level BPE as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = vocab_tokens(vocab)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer(folder: str | Path, vocab: int = VOCAB) -> Path:
    """Write tokenizer.json and tokenizer_config.json (ChatML template, EOS <|im_end|>)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": CONTEXT,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def save_hf_folder(model, folder: str | Path) -> Path:
    """`save_pretrained` (safetensors) plus the tiny tokenizer."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder, model.config.vocab_size)
    return folder


# --------------------------------------------------------------------------- GGUF
def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim (numpy for torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


QTYPES = ("F32", "Q8_0", "Q4_0")


def _qtype(name: str):
    import gguf

    return {
        "F32": gguf.GGMLQuantizationType.F32,
        "Q8_0": gguf.GGMLQuantizationType.Q8_0,
        "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[name]


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's weights as llama.cpp names and lays them out (float32, q/k permuted for llama)."""
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q = sd[p + "self_attn.q_proj.weight"]
        k = sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q = permute_qk(q, n_head, n_head)
            k = permute_qk(k, n_head, n_kv)
        out.update(
            {
                b + "attn_norm.weight": sd[p + "input_layernorm.weight"],
                b + "attn_q.weight": q,
                b + "attn_k.weight": k,
                b + "attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                b + "attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                b + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                b + "ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                b + "ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                b + "ffn_down.weight": sd[p + "mlp.down_proj.weight"],
            }
        )
        if arch == "qwen2":
            for x in "qkv":
                out[b + f"attn_{x}.bias"] = sd[p + f"self_attn.{x}_proj.bias"]
    return out


def _quantizable(name: str, arr: np.ndarray) -> bool:
    return arr.ndim == 2 and name.endswith(".weight") and arr.shape[-1] % 32 == 0


def write_gguf(model, path: str | Path, arch: str | None = None, qtype: str = "F32") -> Path:
    """Write ``model`` as llama.cpp's converter would, 2-D weights in ``qtype`` (norms, biases F32)."""
    import gguf

    arch = arch or hf_arch(model)
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown arch {arch!r}")
    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":  # LlamaModel.set_gguf_parameters adds these two; Qwen2Model does not
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[qtype]
    )
    # gpt2-style (byte-level BPE) vocabulary, as `_set_vocab_gpt2` writes it
    tokens = vocab_tokens(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(
        [
            int(gguf.TokenType.CONTROL) if t in SPECIAL_TOKENS else int(gguf.TokenType.NORMAL)
            for t in tokens
        ]
    )
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index(EOS_TOKEN))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    qt = _qtype(qtype)
    for name, arr in gguf_tensors(model, arch).items():
        if qtype != "F32" and _quantizable(name, arr):
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantized_reference(model, qtype: str):
    """A copy of the HF model whose weights are what a ``qtype`` GGUF holds once dequantised.

    Quantisation works on blocks within a row, so it commutes with llama.cpp's row permutation:
    round-tripping the unpermuted HF weights gives exactly the loader's dequantised weights.
    """
    import copy

    import gguf

    ref = copy.deepcopy(model)
    qt = _qtype(qtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            arr = p.detach().to(torch.float32).numpy()
            if qtype != "F32" and _quantizable(name, arr):
                arr = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt)
            p.copy_(torch.from_numpy(np.array(arr, dtype=np.float32)).to(p.dtype))
    return ref


def corrupt_copies(path: str | Path, tmp: str | Path) -> tuple[Path, Path]:
    """(truncated copy holding the first half of the bytes, copy with a bad magic number)."""
    data = Path(path).read_bytes()
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem
    truncated = tmp / f"{stem}-truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    bad_magic = tmp / f"{stem}-badmagic.gguf"
    bad_magic.write_bytes(b"GGML" + data[4:])
    return truncated, bad_magic
