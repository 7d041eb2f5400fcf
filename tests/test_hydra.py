"""Hydra++ heads: their files, what a step drafts (each depth's guesses from the path
before it, through the prefix layer's cache), and training on a tiny model (the contract
suite and the sampling cases cover exactness)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from random_models import CharTokenizer, random_transformer
from test_eagle import TEXT, tiny  # noqa: F401 - the tiny model fixture, shared
from test_medusa import beats_untrained_and_drafts, held_out_store, train_config
from test_medusa import random_heads as medusa_random_heads

from specdec.models.eagle_head import HeadError
from specdec.models.hydra_heads import HydraHeads, causal_block
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import BuildContext, DraftState
from specdec.speculation.drafters.medusa import medusa_tree
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams

random_heads = partial(medusa_random_heads, kind=HydraHeads)


def test_head_files(tmp_path):
    model = random_transformer("llama", seed=1, vocab=30)
    heads = random_heads(model, subset=12, layers=2)
    heads.config.accuracy = [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]]
    heads.save(tmp_path / "h")
    back = HydraHeads.load(tmp_path / "h")
    assert back.config.accuracy == heads.config.accuracy
    assert back.config.num_layers == 2
    for (k, v), (_, w) in zip(heads.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    other = random_transformer("llama", seed=1, vocab=31)
    with pytest.raises(HeadError, match="were trained for random"):
        back.check_target(other)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps({**cfg, "kind": "medusa"}))
    with pytest.raises(HeadError, match="not a Hydra head config"):
        HydraHeads.load(tmp_path / "h")
    (tmp_path / "h" / "config.json").write_text(json.dumps({**cfg, "num_heads": 2}))
    with pytest.raises(HeadError, match="do not match its config"):
        HydraHeads.load(tmp_path / "h")
    with pytest.raises(HeadError, match="no Hydra head"):
        HydraHeads.load(tmp_path / "nothing")


def test_untrained_heads_read_the_targets_own_state():
    """New heads start where Medusa's do: the prefix norm is the target's, the wide block
    passes the prefix state through, so with a zero prefix layer the head's output is the
    target's normed last state whatever the path."""
    model = random_transformer("llama", seed=2, vocab=20).double()
    heads = HydraHeads.for_target(model, "fresh", 2).double()
    with torch.no_grad():
        for p in heads.prefix.parameters():
            p.zero_()
        last = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
        prefix = heads.prefix_states(model, last)
        assert torch.allclose(prefix, model.norm(last))
        path = torch.randn(5, 2, model.config.hidden_size, dtype=torch.float64)
        assert torch.allclose(heads.head(1, prefix, path), prefix)


def test_the_prefix_layer_trains_as_it_runs():
    """`causal_block` (training, autograd) computes what the runtime's cached passes do."""
    model = random_transformer("llama", seed=5, vocab=20).double()
    x = torch.randn(7, model.config.hidden_size, dtype=torch.float64)
    got = causal_block(model.layers[0], x, model.config)
    cache = model.new_cache()
    a = model(torch.zeros(4, dtype=torch.long), torch.arange(4), cache, layers=[0],
              return_hidden=True, embeds=x[:4])[1]  # fmt: skip
    b = model(torch.zeros(3, dtype=torch.long), torch.arange(4, 7), cache, layers=[0],
              return_hidden=True, embeds=x[4:])[1]  # fmt: skip
    assert torch.allclose(got, torch.cat([a, b]), atol=1e-10)


def test_each_depth_guesses_from_the_path_before_it(tmp_path):
    """Head k's guesses at depth k + 1 come from the prefix state at the last committed
    position beside the embeddings of the pending token and of the node's path, ranked by
    its logits over the draft vocabulary, along the tree of the recorded accuracies; the
    prefix layer sees every committed row, in as many steps as they came."""
    model = random_transformer("llama", seed=3, vocab=24).double()
    heads = random_heads(model, seed=4, subset=15)
    heads.config.accuracy = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.1], [0.4, 0.2, 0.1]]
    heads.save(tmp_path / "h")
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model))
    drafter = get_method("hydra").build(ctx, {"heads": str(tmp_path / "h"), "top_k": 3})
    tokens = [3, 9, 4, 1, 7, 7, 2]
    target = NativeTarget(model)
    _, hidden = target.forward(
        tokens[:-1], return_hidden=True, hidden_layers=drafter.feature_layers
    )
    drafter.reset(tokens)
    drafter.observe_features(hidden[:4])  # the prompt, then a step's rows
    drafter.observe_features(hidden[4:])
    tree = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert len(tree) == 16  # no pass costs: the default size
    with torch.no_grad():
        prefix = heads.double().prefix_states(model, hidden)[-1:]
        embed = model.embed.weight
        rows = model.lm_head.weight[heads.d2t]
    paths, _ = medusa_tree(heads.config.accuracy, 16)
    token = {(): tokens[-1]}
    for node, path in enumerate(paths):
        chain = torch.stack([embed[token[path[:i]]] for i in range(len(path))])
        with torch.no_grad():
            out = heads.head(len(path) - 1, prefix, chain[None])
        rank = heads.d2t[(out @ rows.T)[0].argsort(descending=True)].tolist()
        token[path] = rank[path[-1]]
        assert tree.tokens[node] == token[path], path
        assert tree.depths[node] == len(path) - 1
        assert tree.parents[node] == (paths.index(path[:-1]) if len(path) > 1 else -1)
    assert drafter.node_scores()[:3] == pytest.approx([0.7, 0.35, 0.21])
    # the budget bounds depth and size
    small = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=3))
    assert len(small) <= 2 and max(small.depths) <= 1
    # a new request starts the prefix layer's cache afresh
    drafter.reset(tokens)
    drafter.observe_features(hidden)
    again = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert again.tokens == tree.tokens
    # sized to nothing, it guesses nothing and leaves the prefix layer idle; sized again,
    # it catches up on every row it skipped and guesses as before
    drafter.reset(tokens)
    drafter.size = 0
    drafter.observe_features(hidden[:4])
    drafter.observe_features(hidden[4:])
    assert len(drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))) == 0
    assert drafter.cache.length == 0
    drafter.size = 16
    late = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert drafter.cache.length == len(hidden) and late.tokens == tree.tokens


def test_hydra_without_heads_says_how_to_train_them(tmp_path, monkeypatch):
    from specdec.errors import InvalidRequestError

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("llama", seed=1, vocab=24)
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model),
                       model="tiny")  # fmt: skip
    with pytest.raises(InvalidRequestError, match="specdec train hydra --model tiny"):
        get_method("hydra").build(ctx, {})


def hydra_config(corpus, **kw):
    return train_config("hydra", corpus, **kw)


def test_training_learns_the_target(tiny, tmp_path):  # noqa: F811 - the fixture
    from specdec.models.eagle_head import head_rows
    from specdec.train.hydra import sequence_loss, train
    from specdec.train.medusa import rank_accuracy

    gen, corpus, _ = tiny
    cfg = hydra_config(corpus, tokens=40_000, num_layers=2, lr=3e-3, held_out=0.2, dropout=0.0)
    report = train(gen, cfg, out=tmp_path / "h", work=tmp_path / "work", progress=False)
    heads = HydraHeads.load(tmp_path / "h")
    acc = heads.config.accuracy
    assert len(acc) == 2 and all(len(row) == 4 for row in acc)
    # the same held-out sequences through untrained heads (the target's own next-token
    # guess, one place early)
    model = gen.target.model
    held = held_out_store(gen, tmp_path / "work", report)
    fresh = HydraHeads.for_target(model, "fresh", 2, 2, heads.d2t)
    weight = head_rows(model, heads.d2t)
    with torch.no_grad():
        results = [sequence_loss(fresh, model, weight, t, h.float(), cfg) for t, h in held]
    untrained = rank_accuracy(results, 2, 4)
    beats_untrained_and_drafts(gen, "hydra", tmp_path / "h", report, untrained)
    trained = report["evaluation"]
    assert sum(acc[0]) == pytest.approx(trained["top4_by_head"][0], abs=1e-3)
