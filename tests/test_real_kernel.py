"""The quantised kernel (``--quant gguf``) on real GGUF weights, against references that a
wrong but deterministic kernel cannot pass.

Comparing a method with ``ar`` on the same kernel proves only that the kernel is
deterministic. Here the kernel meets computations it does not share:

- each linear, on real block formats (Q4_K, Q6_K, Q5_0, Q8_0, Q4_1), against x @ W^T in
  float64 with W dequantised by the ``gguf`` package (a decoder independent of
  ``specdec.kernels.packing``): once with the activations exact, once rounded as the
  kernel rounds them (int8 per 32 values), where only float32 accumulation is left;
- the whole 0.5B model: mean KL divergence from the float32 model of the same weights,
  and logits against llama.cpp's on the same file;
- a tree node, and a k-token chain, against one-token passes: bit for bit.

What the model-level bounds can see (measured by planting defects in the packed scales of
the 0.5B, 64 tokens): a sub-block scale off by one in every Q6_K block raised the KL from
2.3e-4 to 1.2e-3 and the largest difference to llama.cpp from 1.8 % to 4.3 % of the logit
scale, beyond both bounds; every Q6_K super-block scale 2 % high moved them only to 3.8e-4
and 2.0 %, inside both. Small defects are the per-linear test's job: its bound with rounded
activations sits at float32 rounding, and `test_planted_defects_are_caught` shows that it
catches one wrong block among thousands.

Marked `real_model` (pulled on demand into the cache). On CPUs without AVX-512 VNNI the
kernel runs its portable path, bit for bit the same results, only slower: the model-level
tests use the 0.5B (it holds every block type of the default 1.5B, and Q5_0 and Q8_0 as
well) and short texts.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from specdec.kernels import packing
from specdec.kernels.native import LinearKernel, PackedWeight
from specdec.models import gguf_file
from specdec.models.catalog import pull
from specdec.models.quant_linear import _GGUF_PARTS, QuantLinear, gguf_parts, linear_names

pytestmark = pytest.mark.real_model

# ---------------------------------------------------------------------------- per linear
# Relative error ||y - ref|| / ||ref|| of the kernel's output.
# - against the activations rounded as the kernel rounds them: float32 accumulation over
#   K/32 groups is all that differs (about sqrt(K/32) * 2^-24 ~ 1e-6); measured at most
#   4.0e-7 over every case below, so 1e-5 has 25x margin. One wrong block in one row of a
#   matrix gives ~1e-3 (`test_planted_defects_are_caught`).
ROUNDED_BOUND = 1e-5
# - against exact activations: int8 per 32 values moves each value by up to amax/254,
#   about amax/440 rms, 0.5-1 % of a typical value (a block's peak is 2.5-4x its rms);
#   measured 1.2e-3 to 9.0e-3 over the cases below, so 0.02 has 2.2x margin.
EXACT_BOUND = 0.02

# The linears checked: every block type each file's linears use (asserted below), a
# matrix fused from parts of two types (wqkv), K = hidden and K = ffn, and the LM head.
LINEARS = {
    "qwen2.5-coder-1.5b": {  # the default model, Q4_K_M
        "layers.0.attn.wqkv": ("Q4_K", "Q6_K"),  # q, k Q4_K; v Q6_K
        "layers.0.attn.wo": ("Q4_K",),
        "layers.0.ffn.w13": ("Q4_K",),
        "layers.0.ffn.w2": ("Q6_K",),
        "layers.2.attn.wqkv": ("Q4_K",),
        "layers.2.ffn.w2": ("Q4_K",),
        "lm_head": ("Q6_K",),
    },
    "qwen2.5-coder-0.5b": {  # also Q4_K_M, but a different mix
        "layers.0.attn.wqkv": ("Q5_0", "Q8_0"),
        "layers.0.ffn.w13": ("Q5_0",),
        "layers.0.ffn.w2": ("Q6_K",),
        "layers.2.ffn.w2": ("Q4_K",),
        "lm_head": ("Q8_0",),
    },
    "smollm2-135m": {  # Q4_1; a llama model (permuted q/k rows) with a tied Q8_0 head
        "layers.0.attn.wqkv": ("Q4_1",),
        "layers.0.ffn.w2": ("Q4_1",),
        "lm_head": ("Q8_0",),
    },
}
CASES = [(model, name) for model, names in LINEARS.items() for name in names]
# Ten fixed token ids (all below SmolLM2's vocabulary of 49152): their embeddings, RMS-normed
# as layer 0 normalises them, are real activations of the width of the hidden state.
TOKEN_IDS = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]
HEAD_STRIDE = 37  # the LM head's float64 reference covers every 37th vocabulary row


@functools.cache
def reader_and_config(model: str):
    path = pull(model, progress=False)
    reader = gguf_file.open_gguf(path)
    return reader, gguf_file.read_config(reader, path)


def gguf_tensor_names(cfg, name: str, tensors: dict) -> list[str]:
    """The GGUF tensors runtime module ``name`` fuses, in order."""
    if name == "lm_head":
        return ["output.weight" if "output.weight" in tensors else "token_embd.weight"]
    layer, module = name.split(".", 2)[1:]
    return [f"blk.{layer}.{part}.weight" for part in _GGUF_PARTS[module]]


def reference_weight(reader, cfg, name: str, row_stride: int = 1) -> tuple[torch.Tensor, list]:
    """Module ``name``'s weights [N, K] in float64, dequantised by the gguf package
    (rows 0, row_stride, ...), and the block type of each GGUF tensor in it."""
    tensors = gguf_file.tensors(reader)
    weights, kinds = [], []
    for g in gguf_tensor_names(cfg, name, tensors):
        t = tensors[g]
        w = np.asarray(gguf.quants.dequantize(t.data[::row_stride], t.tensor_type))
        w = torch.from_numpy(w.astype(np.float64))
        if cfg.permuted_qk_in_gguf and g.endswith(("attn_q.weight", "attn_k.weight")):
            w = gguf_file.unpermute(w, cfg.num_heads if "attn_q" in g else cfg.num_kv_heads)
        weights.append(w)
        kinds.append(t.tensor_type.name)
    return torch.cat(weights), kinds


def layer_input(reader, cfg, name: str) -> torch.Tensor:
    """Float64 activations [10, K] for module ``name``: the normed embeddings of `TOKEN_IDS`,
    and for ``ffn.w2`` what those give after the layer's gate and up projections."""
    tensors = gguf_file.tensors(reader)
    embed = tensors["token_embd.weight"]
    e = np.asarray(gguf.quants.dequantize(embed.data[TOKEN_IDS], embed.tensor_type))
    e = torch.from_numpy(e.astype(np.float64))
    norm = torch.from_numpy(np.asarray(tensors["blk.0.attn_norm.weight"].data, np.float64))
    x = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * norm
    if name.endswith("ffn.w2"):
        gate, up = (x @ reference_weight(reader, cfg, name[:-1] + "13")[0].T).chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    return x.to(torch.float32).to(torch.float64)  # what the kernel is given


def rounded_as_the_kernel_does(x: torch.Tensor) -> torch.Tensor:
    """``x`` after the kernel's int8 rounding per 32 values (qgemm.cpp, quantise_rows):
    scale amax/127, codes nearbyint(x * (127/amax)) in float32, clamped to +-127."""
    blocks = x.to(torch.float32).numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)
    codes = np.clip(np.rint(blocks * inverse.astype(np.float32)), -127, 127)
    scale = (amax / np.float32(127)).astype(np.float32)
    return torch.from_numpy((codes.astype(np.float64) * scale).reshape(x.shape))


def kernel_errors(
    parts: list[PackedWeight], weight: torch.Tensor, x: torch.Tensor, row_stride: int = 1
) -> tuple[float, float]:
    """(error against rounded activations, error against exact ones), each relative:
    ||kernel(x) - ref|| / ||ref||, with ref in float64 from ``weight`` (the kernel's output
    rows 0, row_stride, ... of it)."""
    y = LinearKernel(parts)(x.to(torch.float32))[:, ::row_stride].double()
    exact = x @ weight.T
    rounded = rounded_as_the_kernel_does(x) @ weight.T
    return float((y - rounded).norm() / rounded.norm()), float((y - exact).norm() / exact.norm())


@pytest.mark.parametrize("model,name", CASES)
def test_each_linear_matches_a_float64_reference_of_its_gguf_weights(model, name):
    reader, cfg = reader_and_config(model)
    stride = HEAD_STRIDE if name == "lm_head" else 1
    weight, kinds = reference_weight(reader, cfg, name, stride)
    assert tuple(sorted(set(kinds))) == tuple(sorted(LINEARS[model][name])), kinds
    parts = gguf_parts(reader, cfg, name)  # what `load_model(quant="gguf")` packs
    assert {p.kind for p in parts} == set(kinds)
    x = layer_input(reader, cfg, name)
    rounded_err, exact_err = kernel_errors(parts, weight, x, stride)
    print(f"{model} {name} {kinds}: rounded {rounded_err:.2e}, exact {exact_err:.2e}")
    assert rounded_err < ROUNDED_BOUND
    assert exact_err < EXACT_BOUND


@pytest.mark.parametrize("model", list(LINEARS))
def test_the_cases_cover_every_block_type_of_each_file(model):
    """Every block type any linear of the file uses is among the cases checked above."""
    reader, cfg = reader_and_config(model)
    tensors = gguf_file.tensors(reader)
    used = {
        tensors[g].tensor_type.name
        for name in linear_names(cfg.num_layers)
        for g in gguf_tensor_names(cfg, name, tensors)
    }
    assert used == {kind for kinds in LINEARS[model].values() for kind in kinds}


# ---------------------------------------------------------------------------- planted defects
def _with_defect(kind: str, change):
    """`packing.split_gguf` whose decoded ``kind`` blocks get ``change(parts)`` applied: a
    wrong but deterministic decoder, whose kernel gives the same wrong output every run."""
    original = packing.split_gguf

    def split(raw, type_name, n, k):
        parts = original(raw, type_name, n, k)
        if type_name == kind:
            parts = {f: (v.copy() if isinstance(v, np.ndarray) else v) for f, v in parts.items()}
            change(parts)
        return parts

    return split


def _drop_high_min_bits(parts):  # Q4_K mins of groups 4-7 without their 2 high bits
    parts["m"][:, 4::8] &= 0x0F


def _scale_up_2_percent(parts):  # every super-block scale (and offset with it) 2 % high
    for f in ("d", "dm"):
        parts[f] = (parts[f].astype(np.float32) * 1.02).astype(np.float16)


def _double_one_block(parts):  # one block of one row
    parts["d"][5, 3] *= 2


def _offset_127(parts):  # Q8_0 codes read as q + 127 instead of q + 128
    parts["dm"] = (parts["d"].astype(np.float32) * 127).astype(np.float16)


DEFECTS = {
    "Q4_K mins lose high bits": (
        "qwen2.5-coder-1.5b",
        "layers.0.attn.wo",
        "Q4_K",
        _drop_high_min_bits,
    ),
    "Q6_K scales 2% high": ("qwen2.5-coder-0.5b", "layers.0.ffn.w2", "Q6_K", _scale_up_2_percent),
    "one Q5_0 block doubled": (
        "qwen2.5-coder-0.5b",
        "layers.0.attn.wqkv",
        "Q5_0",
        _double_one_block,
    ),
    "Q8_0 offset 127": ("smollm2-135m", "lm_head", "Q8_0", _offset_127),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defects_are_caught(defect, monkeypatch):
    """The per-linear check fails on a kernel whose weights are decoded wrongly, even when
    the error is one block or a 2 % scale, though that kernel is deterministic (so every
    comparison with ``ar`` on the same kernel would pass)."""
    model, name, kind, change = DEFECTS[defect]
    reader, cfg = reader_and_config(model)
    stride = HEAD_STRIDE if name == "lm_head" else 1
    weight, _ = reference_weight(reader, cfg, name, stride)
    x = layer_input(reader, cfg, name)
    monkeypatch.setattr(packing, "split_gguf", _with_defect(kind, change))
    parts = gguf_parts(reader, cfg, name)
    assert torch.equal(LinearKernel(parts)(x.float()), LinearKernel(parts)(x.float()))
    rounded_err, exact_err = kernel_errors(parts, weight, x, stride)
    print(f"{defect}: rounded {rounded_err:.2e}, exact {exact_err:.2e}")
    assert rounded_err > 10 * ROUNDED_BOUND  # the check above fails, by far


# ---------------------------------------------------------------------------- whole model
MODEL = "qwen2.5-coder-0.5b"  # Q4_K, Q6_K, Q5_0 and Q8_0 blocks: every type of the 1.5B too
TEXT_TOKENS = 64  # of benchmarks.parity's text (code and prose)
# mean KL(float32 || kernel) over the text, in nats: measured 2.3e-4 (3.6e-4 over its first
# 32 tokens; 2.8e-4 over 128); 5e-4 is 2.2x the measured value. The reference has the
# kernel's very weights in float32, so only the int8 activations separate them. (Against
# bfloat16, as docs/BENCHMARKS.md measures it: 4.0e-4 here, bfloat16's own rounding added.)
MEAN_KL_BOUND = 5e-4
MAX_KL_BOUND = 0.01  # at the worst position: measured 2.9e-3


@pytest.fixture(scope="module")
def kernel_model():
    from specdec.models.loading import load_model

    loaded = load_model(MODEL, quant="gguf", progress=False)
    kinds = {p.kind for m in loaded.model.modules() if isinstance(m, QuantLinear) for p in m.parts}
    assert loaded.quant == "gguf" and kinds == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    assert loaded.model.native_layers is not None  # whole layers in one native call each
    return loaded


@pytest.fixture(scope="module")
def text_ids(kernel_model):
    from benchmarks.parity import PARITY_TEXT

    return kernel_model.tokenizer.encode(PARITY_TEXT)[:TEXT_TOKENS]


@pytest.fixture(scope="module")
def kernel_logits(kernel_model, text_ids):
    m = kernel_model.model
    n = len(text_ids)
    return m(torch.tensor(text_ids), torch.arange(n), m.new_cache(), logits_rows=slice(None))


def kl_per_position(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(other)) at each row, in nats, in float64."""
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def test_kl_of_the_kernel_to_the_float32_model_is_bounded(text_ids, kernel_logits):
    from specdec.models.loading import load_model

    ref = load_model(MODEL, quant="none", dtype="float32", progress=False)
    n = len(text_ids)
    ref_logits = ref.model(
        torch.tensor(text_ids), torch.arange(n), ref.model.new_cache(), logits_rows=slice(None)
    )
    del ref
    kl = kl_per_position(ref_logits, kernel_logits)
    print(f"mean KL {kl.mean():.2e}, max {kl.max():.2e}")
    assert kl.mean() < MEAN_KL_BOUND
    assert kl.max() < MAX_KL_BOUND
    assert kl.mean() > 1e-5  # two computations, not one twice (float32 is not the kernel)


# Against llama.cpp on the same file, which rounds activations its own way (to 8 bits per
# 32 or 256 values): measured max |difference| 1.77 % of the largest logit (0.565 at 31.9),
# argmax equal at 64/64 positions, mean KL(llama.cpp || kernel) 4.0e-4.
# Not the 1.5B: at the first position of this text llama.cpp's logits are 10 away from
# bfloat16's (KL 3.4 nats, another argmax) where the kernel's are 1.1 away (KL 3.8e-2);
# at positions 1-15 llama.cpp and the kernel differ by at most 0.73 (KL <= 5.2e-3).
LLAMA_MAX_DIFF = 0.035  # of the logit scale: 2x
LLAMA_ARGMAX_AGREEMENT = 0.95  # at most 3 of 64 near-ties may go the other way
LLAMA_MEAN_KL = 1e-3  # 2.5x


def test_logits_are_close_to_llama_cpps_on_the_same_file(text_ids, kernel_logits):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(
        model_path=str(pull(MODEL, progress=False)),
        n_ctx=2 * TEXT_TOKENS,
        logits_all=True,
        n_threads=1,  # see `one_thread`
        n_threads_batch=1,
        verbose=False,
    )
    llm.eval(text_ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(text_ids)], dtype=np.float32))
    diff = (theirs - kernel_logits).abs().max() / theirs.abs().max()
    agree = (theirs.argmax(-1) == kernel_logits.argmax(-1)).float().mean()
    kl = kl_per_position(theirs, kernel_logits).mean()
    print(f"max diff {diff:.4f} of scale, argmax agreement {agree:.3f}, mean KL {kl:.2e}")
    assert diff < LLAMA_MAX_DIFF
    assert agree >= LLAMA_ARGMAX_AGREEMENT
    assert kl < LLAMA_MEAN_KL


# ---------------------------------------------------------------------------- bit for bit
# A tree under the root r (the engine's pass [r] + tree): a, b children of r; c, f of a;
# d of b; e of d. Leaves c, e, f.
TREE_PARENTS = [-1, -1, 0, 1, 3, 0]


def test_tree_nodes_and_chains_equal_one_token_passes_bit_for_bit(kernel_model, text_ids):
    """What makes lossless methods give ar's tokens on this kernel: each row of a pass is
    computed as a one-token pass would compute it, whatever else the pass holds."""
    from specdec.models.target import NativeTarget
    from specdec.speculation.tree import DraftTree

    prompt, root = text_ids[:6], text_ids[6]
    tree = DraftTree(tokens=[text_ids[i] for i in (7, 30, 8, 31, 32, 40)], parents=TREE_PARENTS)
    target = NativeTarget(kernel_model.model, capacity=64)
    target.forward(prompt)
    start = target.length
    mask, depth = tree.with_root()  # as the engine builds a tree pass
    tree_logits = target.forward(
        [root] + tree.tokens,
        positions=[start + d for d in depth],
        attn_mask=mask,
        logits_rows=slice(None),
    )
    chains = 0
    for leaf in (2, 4, 5):
        path = [leaf]
        while tree.parents[path[0]] >= 0:
            path.insert(0, tree.parents[path[0]])
        tokens = [root] + [tree.tokens[i] for i in path]
        target.rollback(target.length - start)
        one_by_one = torch.cat([target.forward([t]) for t in tokens])
        assert torch.equal(tree_logits[[0] + [i + 1 for i in path]], one_by_one), leaf
        if len(path) == max(depth):  # the deepest path also as one k-token pass
            target.rollback(len(tokens))
            chain = target.forward(tokens, logits_rows=slice(None))  # causal, no mask
            assert torch.equal(chain, one_by_one)
            chains += 1
    assert chains == 1
    # the rows differ from node to node: the comparison is not between copies of one row
    assert not torch.equal(tree_logits[1], tree_logits[2])


# ---------------------------------------------------------------------------- llama.cpp runner
@contextlib.contextmanager
def one_thread():
    """llama.cpp's threads spin at every barrier: on a 2-core machine that another process
    kept busy, two threads made each multi-token pass of SmolLM2 take ~7 s instead of 0.05 s.
    One thread keeps the tests short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_the_llama_cpp_bench_runner_generates_greedily():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from specdec.bench.harness import _row
    from specdec.bench.runners import LlamaCppRunner
    from specdec.models.loading import load_tokenizer

    model = "smollm2-135m"
    tokenizer = load_tokenizer(model, progress=False)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    ids = tokenizer.encode(messages[0]["content"])
    path = pull(model, progress=False)
    with one_thread():  # the runner gives llama.cpp torch's thread count
        runner = LlamaCppRunner("llamacpp-ar", str(path), 512, tokenizer)
    # for the prompt's pass too (it used to take every core there: llama-cpp-python's default)
    assert runner.llm.context_params.n_threads == runner.llm.context_params.n_threads_batch == 1
    out = runner.run(messages, ids, budget=8, temperature=0.0, seed=0)
    print(out)
    assert out.new_tokens == len(out.token_ids) == 8 and out.finish_reason == "length"
    assert out.prompt_tokens == len(ids)
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.wall_s > 0
    assert out.target_passes == out.new_tokens  # the prefill, then one pass per later token
    # greedy: each token is llama.cpp's argmax after the prompt and the tokens before it
    # (evaluated as `generate` evaluates them: the prompt, then one token at a time)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    llm.eval(ids)
    for token in out.token_ids:
        assert int(np.argmax(llm.scores[llm.n_tokens - 1])) == token
        llm.eval([token])
    # the bench's row for this turn
    question = SimpleNamespace(question_id="q0", category="coding", subcategory=None)
    row = _row("llamacpp-ar", question, [out], None, [None], comparable=False)
    assert row["new_tokens"] == 8 and row["tau"] == 1.0 and row["tokens_per_s"] > 0
