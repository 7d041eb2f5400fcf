"""Falcon drafter: files, the relaxed causal mask, drafting k depths per pass (drafting =
what training's teacher-forced passes compute), glancing, and training on a tiny model
(the contract suite and the sampling cases cover exactness)."""

from __future__ import annotations

import json

import pytest
import torch
from random_models import CharTokenizer, random_transformer
from test_eagle import TEXT, tiny  # noqa: F401 - the tiny model fixture, shared
from test_medusa import beats_untrained_and_drafts, held_out_store, train_config

from specdec.models.eagle_head import HeadError
from specdec.models.falcon_heads import (
    FalconHeads,
    block_mask,
    drafting_outputs,
    sequence_outputs,
    slot_rows,
)
from specdec.models.hydra_heads import causal_block
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import BuildContext, DraftState
from specdec.speculation.drafters.medusa import medusa_tree
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams


def random_falcon(model, depths=4, block=2, seed=4, scale=0.5, subset=None) -> FalconHeads:
    vocab = torch.arange(3, 3 + subset) if subset else None
    heads = FalconHeads.for_target(model, "random", depths, 1, vocab, seed=seed, block=block)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads


def test_drafter_files(tmp_path):
    model = random_transformer("qwen2", seed=1, vocab=30)
    heads = random_falcon(model, depths=3, block=3, subset=12)
    heads.config.accuracy = [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]]
    heads.save(tmp_path / "x")
    back = FalconHeads.load(tmp_path / "x")
    assert back.block == 3 and back.config.accuracy == heads.config.accuracy
    for (k, v), (_, w) in zip(heads.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(HeadError, match="were trained for random"):
        back.check_target(random_transformer("qwen2", seed=1, vocab=31))
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    (tmp_path / "x" / "config.json").write_text(json.dumps({**cfg, "block": 0}))
    with pytest.raises(HeadError, match="block must be >= 1"):
        FalconHeads.load(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({**cfg, "kind": "chimera"}))
    with pytest.raises(HeadError, match="not a Falcon head config"):
        FalconHeads.load(tmp_path / "x")


def test_the_relaxed_mask_and_its_blocks():
    """Blocks of k see each other and the blocks before them; a block of 1 is the causal
    decoder layer; within a block, every slot sees the whole block."""
    assert block_mask(5, 2, 1).int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ]
    model = random_transformer("qwen2", seed=2, vocab=20).double()
    tokens = torch.tensor([3, 5, 7, 2, 9, 4])
    normed = model.norm(torch.randn(6, model.config.hidden_size, dtype=torch.float64))
    causal = random_falcon(model, block=1).double()
    e, b = slot_rows(causal, model, tokens, normed)
    with torch.no_grad():
        want = causal_block(causal.layer, causal.inputs(e, b), causal.config.layer)
        assert torch.allclose(sequence_outputs(causal, e, b), want, atol=1e-10)
        heads = random_falcon(model, block=2).double()
        e, b = slot_rows(heads, model, tokens, normed)
        full = sequence_outputs(heads, e, b, phase=1)
        # the block of slots 3, 4 (phase 1): their rows as pass 1 computes them after the
        # prefix whose pending token is at slot 4
        first = drafting_outputs(heads, model, tokens, normed)
        assert torch.allclose(first[0][4 - 1], full[3], atol=1e-10)
        assert torch.allclose(first[1][4 - 1], full[4], atol=1e-10)
        # a later slot changes an earlier one's output only within its block
        e2 = e.clone()
        e2[4] += 1
        changed = sequence_outputs(heads, e2, b, phase=1)
        assert torch.allclose(changed[:3], full[:3], atol=1e-10)
        assert not torch.allclose(changed[3], full[3])


@pytest.mark.parametrize("block", [1, 2, 3])
def test_each_pass_drafts_a_block_of_depths(tmp_path, block):
    """Depth d's guesses come, ranked over the draft vocabulary along the tree of the
    recorded accuracies, from what drafting computes for the node's path teacher-forced
    (pass 1 on the committed block, pass m on the path's blocks): a pass per k depths;
    the committed slots' keys are kept across steps, and a new request starts afresh."""
    model = random_transformer("llama", seed=3, vocab=24).double()
    heads = random_falcon(model, depths=5, block=block, subset=15)
    heads.config.accuracy = [[0.95, 0.3, 0.1]] * 5
    heads.save(tmp_path / "x")
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model))
    drafter = get_method("falcon").build(ctx, {"heads": str(tmp_path / "x"), "top_k": 3})
    tokens = [3, 9, 4, 1, 7, 7, 2]
    _, hidden = NativeTarget(model).forward(
        tokens[:-1], return_hidden=True, hidden_layers=drafter.feature_layers
    )
    drafter.reset(tokens)
    drafter.observe_features(hidden[:3])
    drafter.propose(DraftState(tokens[:4], 3, SamplingParams(), None, budget=100))
    drafter.observe_features(hidden[3:])
    tree = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert len(tree) == 16 and max(tree.depths) == 4  # depth 5: a third pass when k = 2
    heads = heads.double()
    rows = model.lm_head.weight[heads.d2t]
    paths, _ = medusa_tree(heads.config.accuracy, 16)
    token = {(): tokens[-1]}
    normed = model.norm(hidden)
    for node, path in enumerate(paths):
        seq = tokens + [token[path[:i]] for i in range(1, len(path))]
        pad = torch.zeros(len(seq) - len(normed), normed.shape[1], dtype=normed.dtype)
        with torch.no_grad():
            outs = drafting_outputs(heads, model, torch.tensor(seq), torch.cat([normed, pad]))
        out = outs[len(path) - 1][len(tokens) - block]  # the prefix ending at the pending token
        rank = heads.d2t[(out @ rows.T).argsort(descending=True)].tolist()
        token[path] = rank[path[-1]]
        assert tree.tokens[node] == token[path], path
        assert tree.parents[node] == (paths.index(path[:-1]) if len(path) > 1 else -1)
    drafter.reset(tokens)
    drafter.observe_features(hidden)
    again = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert again.tokens == tree.tokens


def test_glancing_replaces_block_starts_with_the_truth():
    """CSGD: lambda x (wrong guesses) block starts, or for k > 2 a k-th of them with runs
    of up to k - 2 slots after each; never more than the candidates."""
    from specdec.train.falcon import glanced_slots

    g = torch.Generator().manual_seed(0)
    starts = torch.arange(0, 40, 2)
    picked = glanced_slots(starts, 7, 2, g)
    assert len(picked) == 7 and len(set(picked.tolist())) == 7
    assert set(picked.tolist()) <= set(starts.tolist())
    assert len(glanced_slots(starts, 100, 2, g)) == len(starts)
    starts = torch.arange(0, 40, 4)
    picked = glanced_slots(starts, 12, 4, g).tolist()
    heads = [s for s in picked if s % 4 == 0]
    assert len(heads) == 3 and all(s % 4 in (0, 1, 2) for s in picked)
    assert all(s - s % 4 in heads for s in picked)


def test_falcon_without_a_drafter_says_how_to_train_one(tmp_path, monkeypatch):
    from specdec.errors import InvalidRequestError

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("llama", seed=1, vocab=24)
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model),
                       model="tiny")  # fmt: skip
    with pytest.raises(InvalidRequestError, match="specdec train falcon --model tiny"):
        get_method("falcon").build(ctx, {})


def test_training_learns_the_target(tiny, tmp_path):  # noqa: F811 - the fixture
    from specdec.models.eagle_head import head_rows
    from specdec.train.falcon import glanced_loss, train
    from specdec.train.medusa import rank_accuracy

    gen, corpus, _ = tiny
    cfg = train_config("falcon", corpus, tokens=40_000, lr=3e-3, held_out=0.2)
    report = train(gen, cfg, out=tmp_path / "x", work=tmp_path / "work", progress=False)
    heads = FalconHeads.load(tmp_path / "x")
    assert len(heads.config.accuracy) == 2 and heads.block == 2
    model = gen.target.model
    held = held_out_store(gen, tmp_path / "work", report)
    fresh = FalconHeads.for_target(model, "fresh", 2, 1, heads.d2t)
    weight = head_rows(model, heads.d2t)
    with torch.no_grad():
        results = [glanced_loss(fresh, model, weight, t, h.float(), cfg, None) for t, h in held]
    untrained = rank_accuracy(results, 2, 4)
    beats_untrained_and_drafts(gen, "falcon", tmp_path / "x", report, untrained)
