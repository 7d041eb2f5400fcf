"""The native small-pass attention (``specdec/kernels/attention.cpp``) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.kernels.native import attend


@pytest.mark.parametrize("d", [8, 16, 64, 128])  # 8: the portable path; others AVX-512
@pytest.mark.parametrize("n,length", [(1, 1), (1, 37), (3, 300), (16, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa(d, n, length, masked):
    g = torch.Generator().manual_seed(d * 1000 + n * 10 + length)
    h, hkv, capacity = 6, 2, length + 9
    q = torch.randn(h, n, d, generator=g)
    keys = torch.randn(hkv, capacity, d, generator=g) * 2
    values = torch.randn(hkv, capacity, d, generator=g)
    mask = None
    if masked:  # causal over the last n slots plus random holes (a tree), older all visible
        mask = torch.ones(n, length, dtype=torch.bool)
        mask[:, length - n :] = torch.ones(n, n, dtype=torch.bool).tril_()
        holes = torch.rand(n, n, generator=g) < 0.3
        mask[:, length - n :] &= ~(holes & ~torch.eye(n, dtype=torch.bool))
    want = F.scaled_dot_product_attention(
        q[None], keys[None, :, :length], values[None, :, :length], attn_mask=mask, enable_gqa=True
    )[0]
    got = attend(q, keys, values, length, mask)
    torch.testing.assert_close(got, want.transpose(0, 1).reshape(n, h * d), atol=2e-5, rtol=1e-5)


def test_rows_do_not_depend_on_each_other():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 9, 64, generator=g)
    keys, values = torch.randn(2, 50, 64, generator=g), torch.randn(2, 50, 64, generator=g)
    together = attend(q, keys, values, 50, None)
    alone = torch.cat(
        [attend(q[:, i : i + 1].contiguous(), keys, values, 50, None) for i in range(9)]
    )
    assert torch.equal(together, alone)


def test_bad_shapes_are_refused():
    q = torch.randn(4, 2, 16)
    kv = torch.randn(2, 10, 16)
    with pytest.raises(ValueError):
        attend(q, kv, kv, 10, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError):
        attend(q.transpose(0, 1), kv, kv, 10, None)


@pytest.mark.parametrize("d", [8, 128])
def test_hidden_keys_do_not_change_the_sums(d):
    """A tree node sees its ancestors with hidden siblings between them: its output must be
    bit for bit that of the same visible keys side by side (a chain)."""
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 40, d, generator=g), torch.randn(2, 40, d, generator=g)
    q = torch.randn(4, 1, d, generator=g)
    visible = torch.rand(40, generator=g) < 0.6
    visible[-1] = True
    idx = visible.nonzero()[:, 0]
    tree = attend(q, keys, values, 40, visible[None])
    chain = attend(q, keys[:, idx].contiguous(), values[:, idx].contiguous(), len(idx), None)
    assert torch.equal(tree, chain)
