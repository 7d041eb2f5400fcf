"""Continuous batching: several sequences in one target pass, each exactly as alone."""

from __future__ import annotations

import pytest
import torch
from random_models import random_transformer, tree_mask_and_depths
from test_quant_model import quantised_model

from specdec.models.transformer import Segment


def _tree_mask():
    parents = [-1, 0, 0, 1, 2, 1]  # the root (the last committed token) and five nodes
    return tree_mask_and_depths(parents)


def _segments(model, history: list[list[int]]):
    """Three sequences with their own caches after a prefill of ``history``: a decode
    step, a chain of three and a tree, each to run next."""
    caches = []
    for h in history:
        c = model.new_cache()
        model(torch.tensor(h), torch.arange(len(h)), c)
        caches.append(c)
    mask, depths = _tree_mask()
    n0, n1, n2 = (len(h) for h in history)
    return [
        Segment([5], [n0], caches[0]),
        Segment([7, 8, 9], [n1, n1 + 1, n1 + 2], caches[1], logits_rows=[0, 2]),
        Segment([3, 4, 6, 2, 1, 11], [n2 + d for d in depths], caches[2], mask),
        Segment(list(range(1, 12)), list(range(11)), model.new_cache()),  # a prefill
    ]


def _solo(model, seg: Segment, hidden_layers=None):
    kw = {"return_hidden": True, "hidden_layers": hidden_layers} if hidden_layers else {}
    return model(
        torch.tensor(seg.tokens),
        torch.tensor(seg.positions),
        seg.cache,
        attn_mask=seg.attn_mask,
        logits_rows=seg.logits_rows,
        **kw,
    )


def _clone_caches(segs):
    import copy

    return [
        Segment(s.tokens, s.positions, copy.deepcopy(s.cache), s.attn_mask, s.logits_rows)
        for s in segs
    ]


@pytest.mark.parametrize("kind", ["float64", "native-int8", "native-int4"])
@pytest.mark.parametrize("hidden", [None, (1, 3)])
def test_a_batched_pass_gives_each_sequence_its_solo_result(kind, hidden):
    if kind == "float64":
        model = random_transformer("qwen2", seed=3)
    else:
        model = quantised_model(5, kind.split("-")[1], torch.float32)
    history = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    batch = _segments(model, history)
    alone = _clone_caches(batch)
    out = model.forward_batch(batch, hidden_layers=hidden)
    for seg, solo, got in zip(batch, alone, out, strict=True):
        want = _solo(model, solo, hidden)
        if hidden is None:
            got, want = (got,), (want,)
        for g, w in zip(got, want, strict=True):
            if kind == "float64":
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
            else:  # the native kernels are per row: bit for bit
                assert torch.equal(g, w)
        n = seg.cache.length
        assert n == solo.cache.length
        assert torch.allclose(seg.cache.k[:, :, :n], solo.cache.k[:, :, :n], atol=1e-12)
        assert torch.allclose(seg.cache.v[:, :, :n], solo.cache.v[:, :, :n], atol=1e-12)
