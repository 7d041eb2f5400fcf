"""Models with quantised linears (``--quant``): loading, caching, and greedy exactness.

Exactness is relative to the model the user loaded: with quantised linears every
lossless method must still give autoregressive decoding's tokens exactly. The kernel
quantises activations per row, so a pass over k tokens computes each row as a
one-token pass would; the rest of these test models runs in float64.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from fixtures import hf_logits, quantized_reference, save_hf_folder, tiny_hf_model, write_gguf
from random_models import path_to, random_transformer, tree_mask_and_depths
from test_contract import FACTORIES, check_same, make_drafter, run

from specdec.errors import UnsupportedModelError
from specdec.kernels import packing
from specdec.models.loading import load_model
from specdec.models.quant_linear import (
    QuantLinear,
    attach_native_layers,
    pack_float_model,
    quantise_linears,
)
from specdec.speculation.drafters.base import NoDrafter


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SPECDEC_CACHE", str(path))
    return path


def logits(loaded, tokens):
    m = loaded.model
    return m(tokens, torch.arange(len(tokens)), m.new_cache())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_blocks_run_in_the_kernel(tmp_path, cache, arch, qtype, tie):
    hf = tiny_hf_model(arch, seed=4, tie=tie)
    path = write_gguf(hf, tmp_path / f"t-{arch}-{qtype}.gguf", arch, qtype)
    loaded = load_model(path, quant="gguf", dtype="float64", progress=False)
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * 3 + 1  # every linear, the LM head included
    assert {p.kind for m in linears for p in m.parts} == {qtype}
    tokens = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(1))
    ours = logits(loaded, tokens)
    exact = hf_logits(quantized_reference(hf, qtype), tokens)  # the file's own weights
    # the only approximation left is the int8 activations (per 32 values)
    # (about 0.7 % per matmul here, 12 matmuls deep: a few per cent; a wrong layout is >30 %)
    assert (ours - exact).norm() < 0.05 * exact.norm()
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    assert list(cache.rglob("packed-gguf.safetensors")), "packed weights are cached"
    again = load_model(path, quant="gguf", dtype="float64", progress=False)
    assert torch.equal(logits(again, tokens), ours)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_float_models_quantise_at_load(tmp_path, quant):
    hf = tiny_hf_model("qwen2", seed=2)
    folder = save_hf_folder(hf, tmp_path / "m")
    loaded = load_model(folder, quant=quant, dtype="float64", progress=False)
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 13
    tokens = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(2))
    rounded = copy.deepcopy(hf)  # the model with our scheme's weights, in float64
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and ("proj" in name or "lm_head" in name):
                w = packing.dequantise(packing.quantise_float(p.float(), quant))
                p.copy_(torch.from_numpy(w))
    ours, ref = logits(loaded, tokens), hf_logits(rounded, tokens)
    assert (ours - ref).norm() < 0.05 * ref.norm()
    assert loaded.weight_bytes < sum(
        p.nbytes for n, p in hf.named_parameters() if "proj" in n or "lm_head" in n
    )


def test_quant_errors_are_clear(tmp_path):
    hf = tiny_hf_model("llama", seed=1)
    folder = save_hf_folder(hf, tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="needs a GGUF"):
        load_model(folder, quant="gguf", progress=False)
    with pytest.raises(UnsupportedModelError, match="unknown quantisation"):
        load_model(folder, quant="int3", progress=False)


def quantised_model(seed: int, quant: str, dtype=torch.float64, arch: str = "qwen2"):
    model = random_transformer(arch, seed=seed, vocab=48, intermediate_size=64, dtype=dtype)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    assert quantise_linears(model, pack_float_model(state, model.config, quant).get) == 13
    # float32: every layer runs as one native call (layer.cpp); float64 keeps the torch path
    assert attach_native_layers(model) == (dtype == torch.float32)
    return model


def quantised_case(seed: int, quant: str, dtype=torch.float64):
    rng = random.Random(seed)
    arch = rng.choice(["qwen2", "llama"])
    model = quantised_model(seed, quant, dtype, arch)
    from random_models import CharTokenizer

    tok = CharTokenizer(vocab=48)
    prompt = [rng.randrange(47) for _ in range(rng.randint(1, 20))]
    n = rng.randint(1, 40)
    return rng, model, tok, prompt, n, run(model, NoDrafter(), prompt, n, tok)


@pytest.mark.parametrize("method", ["draft", "pld", "recycle", "lookahead", "pld+recycle"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("seed", range(4))
def test_quantised_targets_stay_greedy_exact(method, quant, seed):
    rng, model, tok, prompt, n, ref = quantised_case(seed, quant)
    check_same(run(model, make_drafter(method, model, tok, rng), prompt, n, tok), ref)


# every method of the contract suite; cross-vocab's factory builds its draft by remapping
# the target's float LM head, which a quantised target no longer has
@pytest.mark.parametrize("method", sorted(set(FACTORIES) - {"cross-vocab"}))
@pytest.mark.parametrize("seed", range(3))
def test_native_float32_layers_stay_greedy_exact(method, seed):
    """In float32 there is no float64 headroom: exactness rests on rows being computed
    identically whatever the pass size."""
    rng, model, tok, prompt, n, ref = quantised_case(seed, "int8", torch.float32)
    check_same(run(model, make_drafter(method, model, tok, rng), prompt, n, tok), ref)


def test_a_pass_over_k_tokens_equals_k_one_token_passes_bit_for_bit():
    model = quantised_model(11, "int4", torch.float32)
    prompt = torch.tensor([3, 14, 15, 9, 2, 6])
    new = torch.tensor([5, 35, 8, 9, 7, 9, 3])
    cache = model.new_cache()
    model(prompt, torch.arange(6), cache)
    together = model(new, torch.arange(6, 13), cache, logits_rows=slice(None))
    cache.rollback(7)
    alone = torch.cat([model(new[i : i + 1], torch.tensor([6 + i]), cache) for i in range(7)])
    assert torch.equal(together, alone)


def test_a_long_prefill_in_chunks_equals_one_pass_bit_for_bit(monkeypatch):
    """Prompts longer than PREFILL_CHUNK run through the native layers chunk by chunk (faster
    for long prompts); the logits and the cache they leave are those of one pass."""
    from specdec.models import transformer

    model = quantised_model(13, "int8", torch.float32)
    tokens = torch.randint(0, 48, (37,), generator=torch.Generator().manual_seed(1))
    runs = []
    for chunk in (10_000, 8, 5, 1):  # one pass; chunks with a remainder; one token each
        monkeypatch.setattr(transformer, "PREFILL_CHUNK", chunk)
        cache = model.new_cache(capacity=64)
        model(tokens[:4], torch.arange(4), cache)  # a cache that already holds tokens
        logits = model(tokens[4:], torch.arange(4, 37), cache, logits_rows=slice(None))
        runs.append((logits, cache.k[1][:, :37].clone(), cache.v[1][:, :37].clone()))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_native_layers_agree_with_the_torch_path():
    model = quantised_model(12, "int8", torch.float32)
    tokens = torch.randint(0, 48, (20,), generator=torch.Generator().manual_seed(0))
    native = model(tokens, torch.arange(20), model.new_cache())
    model.native_layers = None
    torch_path = model(tokens, torch.arange(20), model.new_cache())
    torch.testing.assert_close(native, torch_path, atol=1e-4, rtol=1e-4)


def test_auto_quantises_only_block_quantised_gguf_files(tmp_path):
    from specdec.kernels import path

    hf = tiny_hf_model("qwen2", seed=3)
    q8 = load_model(write_gguf(hf, tmp_path / "q8.gguf", "qwen2", "Q8_0"), quant="auto")
    f32 = load_model(write_gguf(hf, tmp_path / "f32.gguf", "qwen2", "F32"), quant="auto")
    folder = load_model(save_hf_folder(hf, tmp_path / "m"), quant="auto")
    from specdec.models.loading import cpu_computes_bfloat16

    # float linears compute in bfloat16 where the CPU runs it, float32 elsewhere
    float_dtype = torch.bfloat16 if cpu_computes_bfloat16() else torch.float32
    assert q8.quant == ("gguf" if path() == "avx512-vnni" else "none")
    assert q8.model.dtype == (torch.float32 if q8.quant == "gguf" else float_dtype)
    assert f32.quant == folder.quant == "none"
    assert f32.model.dtype == folder.model.dtype == float_dtype


def test_a_tree_pass_equals_its_paths_run_as_chains_bit_for_bit():
    """With int8 activations a one-ulp difference can flip a code and move logits by ~0.1,
    so a tree node must get exactly its path's logits (head_dim 16: the AVX-512 path)."""
    model = random_transformer(
        "qwen2", seed=3, vocab=48, intermediate_size=64, hidden_size=64, head_dim=16,
        dtype=torch.float32,
    )  # fmt: skip
    state = dict(model.state_dict())
    quantise_linears(model, pack_float_model(state, model.config, "int8").get)
    assert attach_native_layers(model)
    parent = [-1, 0, 0, 1, 1, 2, 5]
    mask, depth = tree_mask_and_depths(parent)
    prompt = torch.tensor([4, 8, 15, 16, 23, 42, 7, 1, 30])
    toks = torch.tensor([11, 12, 13, 14, 15, 16, 17])
    cache = model.new_cache()
    model(prompt, torch.arange(9), cache)
    tree = model(toks, torch.tensor([9 + d for d in depth]), cache, attn_mask=mask,
                 logits_rows=slice(None))  # fmt: skip
    for leaf in (3, 4, 6):
        path = path_to(parent, leaf)
        cache = model.new_cache()
        model(prompt, torch.arange(9), cache)
        chain = model(toks[path], torch.arange(9, 9 + len(path)), cache, logits_rows=slice(None))
        assert torch.equal(tree[path], chain), leaf


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_logits_over_a_vocabulary_subset_equal_the_full_ones(quant):
    """Drafters may ask the LM head for a subset of the vocabulary: same values, bit for bit."""
    model = quantised_model(7, quant, torch.float32)
    tokens = torch.tensor([1, 2, 3, 4, 5])
    full = model(tokens, torch.arange(5), model.new_cache())
    subset = torch.tensor([0, 3, 4, 17, 18, 30, 47])
    part = model(tokens, torch.arange(5), model.new_cache(), vocab_rows=subset)
    assert torch.equal(part, full[:, subset])
    head = model.lm_head.rows(subset)
    assert head.out_features == 7 and head.weight_nbytes < model.lm_head.weight_nbytes / 2
    with pytest.raises(ValueError, match="increasing"):
        model.lm_head.rows(torch.tensor([5, 3]))


def test_a_draft_model_in_a_weight_format_of_its_own(tmp_path):
    """draft_quant: the draft's weights in their own format, loaded once per format; the
    output stays the target's."""
    import specdec

    target = write_gguf(tiny_hf_model("qwen2", seed=4), tmp_path / "t.gguf", "qwen2", "Q8_0")
    draft = write_gguf(tiny_hf_model("qwen2", seed=5), tmp_path / "d.gguf", "qwen2", "Q8_0")
    gen = specdec.load(str(target), quant="gguf", dtype="float64", progress=False)
    kinds = {}
    for quant in ("int4", "gguf", None):
        model = gen.load_draft(str(draft), quant=quant).model
        kinds[quant] = {p.kind for m in model.modules() if isinstance(m, QuantLinear) for p in m.parts}
    assert kinds == {"int4": {"int4"}, "gguf": {"Q8_0"}, None: {"Q8_0"}}  # None: the target's
    assert gen.load_draft(str(draft), quant="int4") is gen.load_draft(str(draft), quant="int4")
    ref = gen.generate("hello", max_new_tokens=12, method="ar", raw=True)
    got = gen.generate("hello", max_new_tokens=12, method="draft", raw=True,
                       draft_model=str(draft), draft_quant="int4")  # fmt: skip
    assert got.token_ids == ref.token_ids and got.stats.drafted > 0
