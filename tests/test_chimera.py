"""Chimera heads: files, the full-context decoder (a decoder layer over the target's states
with the query's own row last), drafting depth by depth from the trigram of each path,
training = drafting, and training on a tiny model (the contract suite and the sampling
cases cover exactness)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from random_models import CharTokenizer, random_transformer
from test_eagle import TEXT, tiny  # noqa: F401 - the tiny model fixture, shared
from test_medusa import beats_untrained_and_drafts, held_out_store, train_config
from test_medusa import random_heads as medusa_random_heads

from specdec.models.chimera_heads import ChimeraHeads, sequence_outputs, trigrams
from specdec.models.eagle_head import HeadError
from specdec.models.hydra_heads import causal_block
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import BuildContext, DraftState
from specdec.speculation.drafters.medusa import medusa_tree
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams

random_heads = partial(medusa_random_heads, kind=ChimeraHeads)


def test_head_files(tmp_path):
    model = random_transformer("qwen2", seed=1, vocab=30)
    heads = random_heads(model, subset=12)
    heads.config.accuracy = [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]]
    heads.save(tmp_path / "x")
    back = ChimeraHeads.load(tmp_path / "x")
    assert back.config.accuracy == heads.config.accuracy
    for (k, v), (_, w) in zip(heads.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(HeadError, match="were trained for random"):
        back.check_target(random_transformer("qwen2", seed=1, vocab=31))
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    (tmp_path / "x" / "config.json").write_text(json.dumps({**cfg, "kind": "clover"}))
    with pytest.raises(HeadError, match="not a Chimera head config"):
        ChimeraHeads.load(tmp_path / "x")


def test_the_decoder_is_a_layer_over_the_states_then_the_query():
    """A query at position t + 1 that sees the states at 0 .. t is the last row of the
    decoder layer run causally over those states followed by the query; untrained heads
    give the target's own normed state."""
    model = random_transformer("qwen2", seed=2, vocab=20).double()
    heads = random_heads(model, seed=3).double()
    d = model.config.hidden_size
    h = torch.randn(6, d, dtype=torch.float64)
    x = torch.randn(3, d, dtype=torch.float64)
    keys, values = heads.keys(h, torch.arange(6))
    with torch.no_grad():
        got = heads.decode(x, torch.tensor([2, 4, 6]), keys, values, torch.tensor([2, 4, 6]))
        for i, t in enumerate([1, 3, 5]):
            seq = torch.cat([h[: t + 1], x[i : i + 1]])
            want = causal_block(heads.decoder, seq, heads.config.layer)[-1]
            assert torch.allclose(got[i], want, atol=1e-10)
        fresh = ChimeraHeads.for_target(model, "fresh", 2).double()
        assert torch.allclose(fresh.head(1, h[:3], x), h[:3])
    assert trigrams(torch.tensor([5, 6, 7, 8])).tolist() == [[5, 5, 5], [5, 5, 6], [5, 6, 7],
                                                             [6, 7, 8]]  # fmt: skip


def test_each_depth_guesses_from_its_paths_trigram(tmp_path):
    """Depth r's guesses come from head r on the decoder's row for the trigram of the
    node's path (the committed tokens and the pending one before it) over every committed
    state, ranked over the draft vocabulary along the tree of the recorded accuracies:
    what training computes for the same tokens; a new request starts afresh."""
    model = random_transformer("llama", seed=3, vocab=24).double()
    heads = random_heads(model, seed=4, subset=15)
    heads.config.accuracy = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.1], [0.4, 0.2, 0.1]]
    heads.save(tmp_path / "x")
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model))
    drafter = get_method("chimera").build(ctx, {"heads": str(tmp_path / "x"), "top_k": 3})
    tokens = [3, 9, 4, 1, 7, 7, 2]
    _, hidden = NativeTarget(model).forward(
        tokens[:-1], return_hidden=True, hidden_layers=drafter.feature_layers
    )
    drafter.reset(tokens)
    drafter.observe_features(hidden[:4])
    drafter.observe_features(hidden[4:])
    tree = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert len(tree) == 16
    heads = heads.double()
    rows = model.lm_head.weight[heads.d2t]
    paths, _ = medusa_tree(heads.config.accuracy, 16)
    token = {(): tokens[-1]}
    for node, path in enumerate(paths):
        seq = tokens + [token[path[:i]] for i in range(1, len(path))]
        with torch.no_grad():  # training's forward over the whole path, teacher-forced
            last = torch.cat([hidden, torch.zeros(len(path), hidden.shape[1], dtype=hidden.dtype)])
            outs = sequence_outputs(heads, model, torch.tensor(seq + [0]), last)
        r = len(path) - 1
        out = outs[r][len(tokens) - 2]  # position t = the last committed one
        rank = heads.d2t[(out @ rows.T).argsort(descending=True)].tolist()
        token[path] = rank[path[-1]]
        assert tree.tokens[node] == token[path], path
        assert tree.parents[node] == (paths.index(path[:-1]) if len(path) > 1 else -1)
    drafter.reset(tokens)
    drafter.observe_features(hidden)
    again = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert again.tokens == tree.tokens


def test_chimera_without_heads_says_how_to_train_them(tmp_path, monkeypatch):
    from specdec.errors import InvalidRequestError

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("llama", seed=1, vocab=24)
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model),
                       model="tiny")  # fmt: skip
    with pytest.raises(InvalidRequestError, match="specdec train chimera --model tiny"):
        get_method("chimera").build(ctx, {})


def test_training_learns_the_target(tiny, tmp_path):  # noqa: F811 - the fixture
    from specdec.models.eagle_head import head_rows
    from specdec.train.chimera import sequence_loss, train
    from specdec.train.medusa import rank_accuracy

    gen, corpus, _ = tiny
    cfg = train_config("chimera", corpus, tokens=40_000, lr=3e-3, held_out=0.2)
    report = train(gen, cfg, out=tmp_path / "x", work=tmp_path / "work", progress=False)
    heads = ChimeraHeads.load(tmp_path / "x")
    assert len(heads.config.accuracy) == 2
    model = gen.target.model
    held = held_out_store(gen, tmp_path / "work", report)
    fresh = ChimeraHeads.for_target(model, "fresh", 2, 1, heads.d2t)
    weight = head_rows(model, heads.d2t)
    with torch.no_grad():
        results = [sequence_loss(fresh, model, weight, t, h.float(), cfg.decay) for t, h in held]
    untrained = rank_accuracy(results, 2, 4)
    beats_untrained_and_drafts(gen, "chimera", tmp_path / "x", report, untrained)
