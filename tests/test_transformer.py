"""The native transformer: incremental decoding, tree masks, layer subsets (float64, exact)."""

import random

import pytest
import torch
from random_models import full_logits, path_to, random_transformer, tree_mask_and_depths

ARCHS = ["qwen2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_equals_full(arch):
    model = random_transformer(arch)
    tokens = torch.randint(0, 64, (24,)).tolist()
    ref = full_logits(model, tokens)
    cache = model.new_cache(capacity=4)  # forces the cache to grow
    out = [model(torch.tensor(tokens[:10]), torch.arange(10), cache)]
    for i in range(10, 24):
        out.append(model(torch.tensor([tokens[i]]), torch.tensor([i]), cache))
    torch.testing.assert_close(torch.cat(out), ref, rtol=0, atol=1e-10)


def random_tree(n: int, rng: random.Random) -> list[int]:
    """Parent index of each node (-1: child of the committed prefix); parents precede children."""
    return [-1 if i == 0 or rng.random() < 0.2 else rng.randrange(i) for i in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", range(4))
def test_tree_parity(arch, seed):
    """Every node of a tree pass has the logits of a plain pass over its root-to-node chain."""
    rng = random.Random(seed)
    model = random_transformer(arch, seed=seed)
    prefix = [rng.randrange(64) for _ in range(rng.randint(1, 12))]
    parents = random_tree(rng.randint(1, 15), rng)
    nodes = [rng.randrange(64) for _ in parents]
    mask, depths = tree_mask_and_depths(parents)
    cache = model.new_cache()
    model(torch.tensor(prefix), torch.arange(len(prefix)), cache)
    positions = torch.tensor([len(prefix) + d for d in depths])
    tree_logits = model(torch.tensor(nodes), positions, cache, attn_mask=mask)
    for i in range(len(nodes)):
        seq = prefix + [nodes[j] for j in path_to(parents, i)]
        ref = full_logits(model, seq)[-1]
        torch.testing.assert_close(tree_logits[i], ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_tree_extended_in_pieces_equals_one_pass(seed):
    """A tree run in two passes (the second with a mask over the first's slots too) gives
    the logits of the whole tree in one pass: how drafters grow trees level by level."""
    rng = random.Random(seed)
    model = random_transformer("qwen2", seed=seed)
    prefix = [rng.randrange(64) for _ in range(5)]
    parents = random_tree(12, rng)
    nodes = [rng.randrange(64) for _ in parents]
    mask, depths = tree_mask_and_depths(parents)
    positions = torch.tensor([len(prefix) + d for d in depths])
    cache = model.new_cache()
    model(torch.tensor(prefix), torch.arange(len(prefix)), cache)
    whole = model(torch.tensor(nodes), positions, cache, attn_mask=mask)
    cache.rollback(len(nodes))
    cut = 5
    first = model(torch.tensor(nodes[:cut]), positions[:cut], cache, attn_mask=mask[:cut, :cut])
    second = model(torch.tensor(nodes[cut:]), positions[cut:], cache, attn_mask=mask[cut:])
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=1e-10)
    with pytest.raises(ValueError):  # wider than the cache
        model(
            torch.tensor([1]),
            torch.tensor([0]),
            cache,
            attn_mask=torch.ones(1, 99, dtype=torch.bool),
        )


def test_layer_subset_and_hidden():
    model = random_transformer("llama")
    tokens = torch.tensor([3, 1, 4, 1, 5])
    pos = torch.arange(5)
    logits, hidden = model(tokens, pos, model.new_cache(), layers=[0, 2], return_hidden=True)
    # the same computation by hand
    h = model.embed(tokens)
    cache = model.new_cache()
    start = cache.begin_write(5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    cos, sin = model.rope().lookup(pos, model.dtype)
    for i in (0, 2):
        b = model.layers[i]
        h = h + b.attn(b.attn_norm(h), cos, sin, cache, i, start, mask)
        h = h + b.ffn(b.ffn_norm(h))
    torch.testing.assert_close(hidden, h, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, model.lm_head(model.norm(h)), rtol=0, atol=1e-12)
    full = full_logits(model, tokens.tolist())
    assert not torch.allclose(logits, full)  # skipping layers changes the result


def test_logits_rows():
    model = random_transformer()
    tokens = list(range(10))
    ref = full_logits(model, tokens)
    rows = model(torch.tensor(tokens), torch.arange(10), model.new_cache(), logits_rows=[2, 7])
    torch.testing.assert_close(rows, ref[[2, 7]], rtol=0, atol=1e-12)


def test_bfloat16_runs_and_tracks_float64():
    m64 = random_transformer("qwen2", seed=3)
    m16 = random_transformer("qwen2", seed=3, dtype=torch.bfloat16)
    tokens = list(range(12))
    a, b = full_logits(m64, tokens), full_logits(m16, tokens)
    assert b.dtype == torch.float32  # logits come back as float32
    assert (a - b.double()).abs().max() < 0.25 * a.abs().max()


def test_logits_over_a_vocabulary_subset():
    model = random_transformer("qwen2", seed=3)
    tokens = torch.tensor([1, 5, 9, 2])
    full = model(tokens, torch.arange(4), model.new_cache())
    subset = torch.tensor([2, 7, 40, 63])
    part = model(tokens, torch.arange(4), model.new_cache(), vocab_rows=subset)
    torch.testing.assert_close(part, full[:, subset], rtol=0, atol=1e-12)
