"""Clover heads: files, the attention decoder's chain, drafting depth by depth (each node
from its chain state and the vector of the token before it), and training on a tiny
model (the contract suite and the sampling cases cover exactness)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from random_models import CharTokenizer, random_transformer
from test_eagle import TEXT, tiny  # noqa: F401 - the tiny model fixture, shared
from test_medusa import beats_untrained_and_drafts, held_out_store, train_config
from test_medusa import random_heads as medusa_random_heads

from specdec.models.clover_heads import CloverHeads
from specdec.models.eagle_head import HeadError
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import BuildContext, DraftState
from specdec.speculation.drafters.medusa import medusa_tree
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams

random_heads = partial(medusa_random_heads, kind=CloverHeads)


def test_head_files(tmp_path):
    model = random_transformer("qwen2", seed=1, vocab=30)
    heads = random_heads(model, subset=12, layers=2)
    heads.config.accuracy = [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]]
    heads.save(tmp_path / "c")
    back = CloverHeads.load(tmp_path / "c")
    assert back.config.accuracy == heads.config.accuracy and back.config.num_layers == 2
    for (k, v), (_, w) in zip(heads.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(HeadError, match="were trained for random"):
        back.check_target(random_transformer("qwen2", seed=1, vocab=31))
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "kind": "hydra"}))
    with pytest.raises(HeadError, match="not a Clover head config"):
        CloverHeads.load(tmp_path / "c")
    with pytest.raises(HeadError, match="no Clover head"):
        CloverHeads.load(tmp_path / "nothing")


def test_the_attention_decoder_gates_the_tokens_value_by_query_and_key():
    """Per attention head: s + SiLU(q·k / sqrt(head_dim)) v, the query on RMSNorm(s), key
    and value on the token's vector; new heads leave the state as it is (W_V zero) and
    read the target's normed state."""
    model = random_transformer("llama", seed=2, vocab=20).double()
    heads = random_heads(model, seed=3).double()
    dec = heads.decoders[1]
    s = torch.randn(4, model.config.hidden_size, dtype=torch.float64)
    e = torch.randn_like(s)
    n, hd = dec.n_heads, s.shape[1] // dec.n_heads
    with torch.no_grad():
        q = (dec.norm(s) @ dec.wq.weight.T).view(4, n, hd)
        k, v = (e @ dec.wk.weight.T).view(4, n, hd), (e @ dec.wv.weight.T).view(4, n, hd)
        want = s + (torch.nn.functional.silu((q * k).sum(-1) / hd**0.5)[..., None] * v).flatten(1)
        assert torch.allclose(dec(s, e), want)
        fresh = CloverHeads.for_target(model, "fresh", 2).double()
        out, after = fresh.step(1, s, e)
        assert torch.equal(after, s) and torch.allclose(out, model.norm(s))


def test_each_depth_guesses_from_its_chain_state(tmp_path):
    """Depth k + 1's guesses come from head k on the chain state of the node's parent
    advanced by the vector of the parent's token (the pending token for depth 1; the
    augmenting block's output at the last committed position starts the chain), ranked by
    its logits over the draft vocabulary, along the tree of the recorded accuracies;
    tokens outside the draft vocabulary have a zero vector."""
    model = random_transformer("qwen2", seed=3, vocab=24).double()
    heads = random_heads(model, seed=4, subset=15)
    heads.config.accuracy = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.1], [0.4, 0.2, 0.1]]
    heads.save(tmp_path / "c")
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model))
    drafter = get_method("clover").build(ctx, {"heads": str(tmp_path / "c"), "top_k": 3})
    outside = sorted(set(range(24)) - set(heads.d2t.tolist()))
    tokens = [3, 9, 4, 1, 7, 7, outside[0]]  # the pending token outside the draft vocabulary
    target = NativeTarget(model)
    _, hidden = target.forward(
        tokens[:-1], return_hidden=True, hidden_layers=drafter.feature_layers
    )
    drafter.reset(tokens)
    drafter.observe_features(hidden[:4])
    drafter.observe_features(hidden[4:])
    tree = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert len(tree) == 16
    with torch.no_grad():
        heads = heads.double()
        s0 = heads.prefix_states(model, hidden)[-1:]
        rows = model.lm_head.weight[heads.d2t]
        vectors = CloverHeads.token_vectors(rows).double()
    where = {int(t): i for i, t in enumerate(heads.d2t)}

    def vector(t):
        return vectors[where[t]][None] if t in where else torch.zeros_like(s0)

    paths, _ = medusa_tree(heads.config.accuracy, 16)
    token, state = {(): tokens[-1]}, {(): s0}
    for node, path in enumerate(paths):
        with torch.no_grad():
            out, state[path] = heads.step(len(path) - 1, state[path[:-1]], vector(token[path[:-1]]))
        rank = heads.d2t[(out @ rows.T)[0].argsort(descending=True)].tolist()
        token[path] = rank[path[-1]]
        assert tree.tokens[node] == token[path], path
        assert tree.parents[node] == (paths.index(path[:-1]) if len(path) > 1 else -1)
    drafter.reset(tokens)
    drafter.observe_features(hidden)
    again = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert again.tokens == tree.tokens


def test_clover_without_heads_says_how_to_train_them(tmp_path, monkeypatch):
    from specdec.errors import InvalidRequestError

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("llama", seed=1, vocab=24)
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model),
                       model="tiny")  # fmt: skip
    with pytest.raises(InvalidRequestError, match="specdec train clover --model tiny"):
        get_method("clover").build(ctx, {})


def test_training_learns_the_target(tiny, tmp_path):  # noqa: F811 - the fixture
    from specdec.models.eagle_head import head_rows
    from specdec.train.clover import sequence_loss, train
    from specdec.train.medusa import rank_accuracy

    gen, corpus, _ = tiny
    cfg = train_config("clover", corpus, tokens=40_000, num_layers=2, lr=3e-3, held_out=0.2)
    report = train(gen, cfg, out=tmp_path / "c", work=tmp_path / "work", progress=False)
    heads = CloverHeads.load(tmp_path / "c")
    assert len(heads.config.accuracy) == 2
    model = gen.target.model
    held = held_out_store(gen, tmp_path / "work", report)
    fresh = CloverHeads.for_target(model, "fresh", 2, 2, heads.d2t)
    weight = head_rows(model, heads.d2t)
    vectors = CloverHeads.token_vectors(weight)
    t2d = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    t2d[heads.d2t] = torch.arange(heads.d2t.numel())
    with torch.no_grad():
        results = [sequence_loss(fresh, model, weight, vectors, t2d, t, h.float(), cfg.decay)
                   for t, h in held]  # fmt: skip
    untrained = rank_accuracy(results, 2, 4)
    beats_untrained_and_drafts(gen, "clover", tmp_path / "c", report, untrained)
