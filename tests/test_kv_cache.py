"""The KV cache: after any appends, rollbacks and keeps, decoding equals a fresh forward over the kept tokens."""

import random

import pytest
import torch
from random_models import full_logits, random_transformer

from specdec.models.kv_cache import KVCache


@pytest.mark.parametrize("seed", range(6))
def test_random_cache_operations(seed):
    rng = random.Random(seed)
    model = random_transformer("qwen2" if seed % 2 else "llama", seed=seed)
    cache = model.new_cache(capacity=2)
    kept: list[int] = []  # the committed token sequence the cache should hold
    for _ in range(12):
        n = rng.randint(1, 6)
        new = [rng.randrange(64) for _ in range(n)]
        start = len(kept)
        model(torch.tensor(new), torch.arange(start, start + n), cache)  # a chain pass
        op = rng.choice(["commit", "rollback", "keep"])
        if op == "commit":
            kept += new
        elif op == "rollback":
            r = rng.randint(0, n)
            cache.rollback(r)
            kept += new[: n - r]
        else:
            # keep a prefix-closed subset: a chain pass's kept tokens must keep their positions
            m = rng.randint(0, n)
            cache.keep(list(range(m)))
            kept += new[:m]
        assert cache.length == len(kept)
    probe = rng.randrange(64)
    got = model(torch.tensor([probe]), torch.tensor([len(kept)]), cache)[0]
    ref = full_logits(model, kept + [probe])[-1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("capacity", [256, 2])  # 2: the cache regrows inside a forward
def test_keep_compacts_a_tree_branch(capacity):
    """Keep a non-contiguous set (a tree branch) and continue as if only it had been written."""
    model = random_transformer("qwen2", seed=11)
    prefix = [5, 9, 2, 7]
    cache = model.new_cache(capacity=capacity)
    model(torch.tensor(prefix), torch.arange(4), cache)
    # tree: 0 -> 1, 0 -> 2 -> 3 ; depths 0,1,1,2; keep branch 0,2,3
    nodes = [11, 12, 13, 14]
    parents = [-1, 0, 0, 2]
    mask = torch.eye(4, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    model(torch.tensor(nodes), torch.tensor([4, 5, 5, 6]), cache, attn_mask=mask)
    cache.keep([0, 2, 3])
    assert cache.length == 7
    got = model(torch.tensor([20]), torch.tensor([7]), cache)[0]
    ref = full_logits(model, prefix + [11, 13, 14, 20])[-1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_cache_bookkeeping_errors_and_bytes():
    cache = KVCache(2, 2, 4, capacity=8, max_capacity=16, dtype=torch.float32)
    assert cache.nbytes == 2 * 2 * 2 * 8 * 4 * 4
    cache.begin_write(5)
    with pytest.raises(ValueError):
        cache.keep([3, 1])
    with pytest.raises(ValueError):
        cache.keep([5])
    with pytest.raises(ValueError):
        cache.rollback(6)
    cache.begin_write(11)  # grows to the max
    assert cache.capacity == 16
    from specdec.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        cache.begin_write(1)
