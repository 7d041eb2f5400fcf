"""Tests of the transformers adapter (`HFTarget`) on tiny random float64 models.

Llama (which the native runtime also runs) and two architectures it does not:
GPT-2 (learned absolute positions, LayerNorm, fused QKV) and GPT-NeoX
(partial rotary). Every cached pass, tree pass, rollback and keep is checked
against a plain uncached forward of the equivalent sequence.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from random_models import path_to, tree_mask_and_depths

from specdec.engine import Engine, Generation
from specdec.errors import (
    InvalidRequestError,
    ModelFormatError,
    ModelNotFoundError,
)
from specdec.models.hf_target import HFTarget, load_hf_target
from specdec.models.tokenizer import Tokenizer
from specdec.speculation.sampling import SamplingParams

VOCAB = 64
TOL = 1e-10

transformers.logging.set_verbosity_error()


def tiny_llama() -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2() -> transformers.PreTrainedModel:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(cfg)


def tiny_neox() -> transformers.PreTrainedModel:
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.5,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPTNeoXForCausalLM(cfg)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gpt_neox": tiny_neox}


@pytest.fixture(params=list(BUILDERS))
def model(request):
    torch.manual_seed(0)
    m = BUILDERS[request.param]().to(torch.float64).eval()
    return m


@torch.no_grad()
def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits of a plain, uncached, causal forward over ``tokens``."""
    return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) < TOL


def test_config_and_max_length(model):
    t = HFTarget(model)
    assert t.config.vocab_size == VOCAB
    assert t.config.max_position_embeddings == t.max_length == 128
    assert t.config.num_layers == 2 and t.length == 0
    t.forward([i % VOCAB for i in range(100)])
    with pytest.raises(InvalidRequestError):
        t.forward([1] * 29)
    assert t.length == 100
    t.forward([1] * 28)


# (a) chain: prefill then one token at a time equals a full forward
def test_chain_decode_matches_full_forward(model):
    rng = random.Random(1)
    seq = rand_tokens(rng, 15)
    ref = full_logits(model, seq)
    t = HFTarget(model)
    got = [t.forward(seq[:10])]
    for i in range(10, 15):
        got.append(t.forward([seq[i]], positions=[i]))
    assert t.length == 15
    assert close(torch.cat(got), ref)
    # A multi-token chain pass on top of the cache is causal too.
    t.rollback(5)
    assert close(t.forward(seq[10:]), ref[10:])


def test_logits_rows(model):
    rng = random.Random(2)
    seq = rand_tokens(rng, 8)
    ref = full_logits(model, seq)
    for rows, want in [
        (slice(-1, None), ref[-1:]),
        (slice(2, 5), ref[2:5]),
        ([0, 3, 7], ref[[0, 3, 7]]),
        ([-1], ref[-1:]),
        (None, ref),
    ]:
        t = HFTarget(model)
        assert close(t.forward(seq, logits_rows=rows), want), rows
        assert t.length == 8


def random_tree(rng: random.Random, n: int) -> list[int]:
    """Parents of n nodes; node 0 is the root (parent -1), a node's parent comes before it."""
    return [-1] + [rng.randrange(i) for i in range(1, n)]


# (b) tree: each node's logits equal a plain forward of prefix + its root-to-node chain
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_matches_chains(model, seed):
    rng = random.Random(seed)
    prefix = rand_tokens(rng, 10)
    parents = random_tree(rng, 7)
    nodes = rand_tokens(rng, 7)
    mask, depths = tree_mask_and_depths(parents)
    t = HFTarget(model)
    t.forward(prefix)
    logits = t.forward(nodes, positions=[10 + d for d in depths], attn_mask=mask)
    assert t.length == 17
    for i in range(7):
        ref = full_logits(model, prefix + [nodes[j] for j in path_to(parents, i)])[-1]
        assert close(logits[i], ref), i


def test_tree_extended_in_pieces(model):
    """The second pass's mask also covers the first pass's slots (a tree grown level by level)."""
    rng = random.Random(3)
    prefix = rand_tokens(rng, 10)
    parents = random_tree(rng, 7)
    nodes = rand_tokens(rng, 7)
    mask, depths = tree_mask_and_depths(parents)
    positions = [10 + d for d in depths]
    t = HFTarget(model)
    t.forward(prefix)
    whole = t.forward(nodes, positions=positions, attn_mask=mask)
    t.rollback(7)
    first = t.forward(nodes[:3], positions=positions[:3], attn_mask=mask[:3, :3])
    second = t.forward(nodes[3:], positions=positions[3:], attn_mask=mask[3:])
    assert close(torch.cat([first, second]), whole)


def test_tree_mask_is_honoured(model):
    """A mask that hides siblings changes the logits (the mask is not silently ignored)."""
    rng = random.Random(5)
    prefix, nodes = rand_tokens(rng, 6), rand_tokens(rng, 3)
    star = torch.eye(3, dtype=torch.bool)
    star[:, 0] = True  # nodes 1 and 2 are both children of node 0
    t = HFTarget(model)
    t.forward(prefix)
    tree = t.forward(nodes, positions=[6, 7, 7], attn_mask=star)
    t.rollback(3)
    chain = t.forward(nodes, positions=[6, 7, 7])
    assert close(tree[:2], chain[:2])
    assert not close(tree[2], chain[2])
    with pytest.raises(ValueError):
        t.forward(nodes, attn_mask=torch.ones(2, 2, dtype=torch.bool))


# (c) rollback and keep
def test_rollback_then_continue(model):
    rng = random.Random(3)
    prefix, draft, more = rand_tokens(rng, 10), rand_tokens(rng, 5), rand_tokens(rng, 4)
    t = HFTarget(model)
    t.forward(prefix)
    t.forward(draft)
    t.rollback(3)
    assert t.length == 12
    got = t.forward(more)
    ref = full_logits(model, prefix + draft[:2] + more)[12:]
    assert close(got, ref)
    with pytest.raises(ValueError):
        t.rollback(17)
    t.rollback(0)
    assert t.length == 16


def test_keep_then_continue(model):
    rng = random.Random(4)
    prefix, draft, more = rand_tokens(rng, 10), rand_tokens(rng, 5), rand_tokens(rng, 3)
    # Nodes 0, 2, 3 form a chain at depths 0, 1, 2; 1 and 4 are side branches.
    parents = [-1, 0, 0, 2, 1]
    mask, depths = tree_mask_and_depths(parents)
    assert [depths[i] for i in (0, 2, 3)] == [0, 1, 2]
    t = HFTarget(model)
    t.forward(prefix)
    t.forward(draft, positions=[10 + d for d in depths], attn_mask=mask)
    t.keep([0, 2, 3])
    assert t.length == 13
    got = t.forward(more)
    kept = [draft[i] for i in (0, 2, 3)]
    assert close(got, full_logits(model, prefix + kept + more)[13:])
    with pytest.raises(ValueError):
        t.keep([2, 1])  # not increasing
    with pytest.raises(ValueError):
        t.keep([3])  # the latest pass wrote 3 slots


def test_keep_prefix_and_reset(model):
    rng = random.Random(6)
    prefix, draft, more = rand_tokens(rng, 10), rand_tokens(rng, 4), rand_tokens(rng, 2)
    t = HFTarget(model)
    t.forward(prefix)
    t.forward(draft)
    t.keep([0, 1])  # a prefix of the pass: plain crop
    assert t.length == 12
    assert close(t.forward(more), full_logits(model, prefix + draft[:2] + more)[12:])
    t.reset()
    assert t.length == 0
    assert close(t.forward(more), full_logits(model, more))


# (d) the engine loop runs unchanged on the adapter
def word_tokenizer(folder) -> Tokenizer:
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(VOCAB)}
    fast = FastTokenizer(WordLevel(vocab, unk_token="w0"))
    fast.pre_tokenizer = WhitespaceSplit()
    fast.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w63"}))
    return Tokenizer(folder)


def test_engine_greedy_matches_generate(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().to(torch.float64).eval()
    tok = word_tokenizer(tmp_path)
    eos = tok.token_to_id("w63")
    assert tok.eos_token_ids == {eos}
    prompt = tok.encode("w5 w17 w3 w42 w9 w11 w30")
    ref = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    out = Generation()
    text = "".join(
        Engine(HFTarget(model), tok).stream(
            prompt, max_new_tokens=24, sampling=SamplingParams(temperature=0.0), result=out
        )
    )
    assert out.token_ids == ref
    assert len(ref) > 1
    assert out.stats.target_passes == len(ref)
    assert text.split() == [f"w{i}" for i in ref if i != eos]


# loading
def test_load_hf_target_from_folder(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2().to(torch.float64).eval()
    model.save_pretrained(tmp_path)
    word_tokenizer(tmp_path)
    target, info = load_hf_target(tmp_path, dtype="float64")
    assert info.config.architecture == "gpt2" and info.tokenizer is not None
    assert target.tokenizer is info.tokenizer and info.weight_bytes > 0
    seq = list(range(1, 12))
    assert close(target.forward(seq), full_logits(model, seq))


def test_load_errors(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_hf_target(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError):
        load_hf_target(tmp_path)  # no config.json
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFormatError) as e:
        load_hf_target(tmp_path, dtype="float32")
    assert "\n" not in str(e.value)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError):
        load_hf_target(tmp_path)  # no safetensors


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_with_eager_attention(arch):
    """The additive mask suits the eager implementation as well as sdpa.

    Llama's eager attention takes its softmax in float32 (transformers 5.24), so
    even a float64 model only agrees to float32 rounding there.
    """
    tol = 1e-6 if arch == "llama" else TOL
    torch.manual_seed(0)
    built = BUILDERS[arch]()
    model = type(built)._from_config(built.config, attn_implementation="eager")
    model = model.to(torch.float64).eval()
    assert model.config._attn_implementation == "eager"
    rng = random.Random(7)
    prefix, nodes = rand_tokens(rng, 10), rand_tokens(rng, 7)
    parents = random_tree(rng, 7)
    mask, depths = tree_mask_and_depths(parents)
    t = HFTarget(model)
    t.forward(prefix)
    logits = t.forward(nodes, positions=[10 + d for d in depths], attn_mask=mask)
    for i in range(7):
        ref = full_logits(model, prefix + [nodes[j] for j in path_to(parents, i)])[-1]
        assert float((logits[i] - ref).abs().max()) < tol, i


def test_tree_refused_without_mask_support(monkeypatch):
    from specdec.errors import UnsupportedModelError

    torch.manual_seed(0)
    t = HFTarget(tiny_llama().to(torch.float64))
    t.forward([1, 2, 3])
    monkeypatch.setattr(t.model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(UnsupportedModelError):
        t.forward([4, 5], attn_mask=torch.ones(2, 2, dtype=torch.bool).tril())
    assert t.length == 3
