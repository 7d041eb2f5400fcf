"""Medusa heads: their files, the tree built from their accuracies, what a step drafts,
and training on a tiny model (the contract suite and the sampling cases cover exactness)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from random_models import CharTokenizer, random_transformer
from test_eagle import TEXT, tiny  # noqa: F401 - the tiny model fixture, shared

from specdec.models.eagle_head import HeadError
from specdec.models.medusa_heads import MedusaHeads
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import BuildContext, DraftState
from specdec.speculation.drafters.medusa import medusa_tree
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams


def random_heads(model, seed=0, subset=None, heads=3, layers=1, scale=0.3, kind=MedusaHeads):
    """A head set of ``kind`` for ``model``: random weights (norms left at one), drafting
    among a random ``subset`` of the vocabulary (None: all of it)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = torch.randperm(vocab, generator=g)[:subset] if subset else None
    m = kind.for_target(model, "random", heads, layers, tokens)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m


def test_the_tree_takes_the_likeliest_paths_best_first():
    acc = [[0.6, 0.2, 0.09], [0.5, 0.3, 0.1], [0.4, 0.2, 0.1]]
    paths, scores = medusa_tree(acc, 6)
    assert paths == [(0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0)]
    assert scores == pytest.approx([0.6, 0.3, 0.2, 0.18, 0.12, 0.1])
    # every prefix is a tree: each path's parent comes before it
    for i, p in enumerate(paths):
        assert len(p) == 1 or p[:-1] in paths[:i]
    # the whole tree when asked for more than it has
    assert len(medusa_tree(acc, 10_000)[0]) == 3 + 9 + 27


def test_head_files(tmp_path):
    model = random_transformer("llama", seed=1, vocab=30)
    heads = random_heads(model, subset=12)
    heads.config.accuracy = [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]]
    heads.save(tmp_path / "m")
    back = MedusaHeads.load(tmp_path / "m")
    assert back.config.accuracy == heads.config.accuracy
    for (k, v), (_, w) in zip(heads.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    other = random_transformer("llama", seed=1, vocab=31)
    with pytest.raises(HeadError, match="trained for random"):
        back.check_target(other)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "kind": "eagle"}))
    with pytest.raises(HeadError, match="not a Medusa head config"):
        MedusaHeads.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HeadError, match="damaged"):
        MedusaHeads.load(tmp_path / "m")
    with pytest.raises(HeadError, match="no Medusa head"):
        MedusaHeads.load(tmp_path / "nothing")


def test_each_head_guesses_from_the_last_committed_state(tmp_path):
    """Head k's guesses at depth k + 1 come from the target's state at the last committed
    position (the one whose logits gave the root), ranked by its logits over the draft
    vocabulary, along the tree of the recorded accuracies."""
    model = random_transformer("llama", seed=3, vocab=24).double()
    heads = random_heads(model, seed=4, subset=15)
    heads.config.accuracy = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.1], [0.4, 0.2, 0.1]]
    heads.save(tmp_path / "m")
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model))
    drafter = get_method("medusa").build(ctx, {"heads": str(tmp_path / "m"), "top_k": 3})
    tokens = [3, 9, 4, 1, 7, 7, 2]
    target = NativeTarget(model)
    _, hidden = target.forward(
        tokens[:-1], return_hidden=True, hidden_layers=drafter.feature_layers
    )
    drafter.reset(tokens)
    drafter.observe_features(hidden)
    tree = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=100))
    assert len(tree) == 16  # no pass costs: the default size
    with torch.no_grad():
        out = heads.double()(model, hidden[-1:])[0]
        logits = torch.nn.functional.linear(out, model.lm_head.weight[heads.d2t])
    rank = [heads.d2t[logits[k].argsort(descending=True)].tolist() for k in range(3)]
    paths, _ = medusa_tree(heads.config.accuracy, 16)
    for node, path in enumerate(paths):
        assert tree.tokens[node] == rank[len(path) - 1][path[-1]]
        assert tree.depths[node] == len(path) - 1
    assert drafter.node_scores()[:3] == pytest.approx([0.7, 0.35, 0.21])
    # the budget bounds depth and size
    small = drafter.propose(DraftState(tokens, 3, SamplingParams(), None, budget=3))
    assert len(small) <= 2 and max(small.depths) <= 1


def test_medusa_without_heads_says_how_to_train_them(tmp_path, monkeypatch):
    from specdec.errors import InvalidRequestError

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("llama", seed=1, vocab=24)
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24, target=NativeTarget(model),
                       model="tiny")  # fmt: skip
    with pytest.raises(InvalidRequestError, match="specdec train medusa --model tiny"):
        get_method("medusa").build(ctx, {})


def train_config(kind: str, corpus, **kw):
    """A tiny run's settings for ``kind`` (the head sets that share Medusa's training)."""
    from specdec.train.chimera import ChimeraTrainConfig
    from specdec.train.clover import CloverTrainConfig
    from specdec.train.falcon import FalconTrainConfig
    from specdec.train.hydra import HydraTrainConfig
    from specdec.train.medusa import MedusaTrainConfig

    base = dict(data=str(corpus), minutes=None, tokens=4000, feature_tokens=1200, seq_len=48,
                respond=0, draft_vocab=200, num_heads=2, lr=3e-3, checkpoint_s=1e9, top_k=4)  # fmt: skip
    configs = {"medusa": MedusaTrainConfig, "hydra": HydraTrainConfig,
               "clover": CloverTrainConfig, "chimera": ChimeraTrainConfig,
               "falcon": FalconTrainConfig}  # fmt: skip
    return configs[kind](**{**base, **kw})


def held_out_store(gen, work, report) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out (tokens, hidden states) sequences of the feature store a run made in
    ``work``."""
    from specdec.train.eagle import FeatureStore

    store = next(work.glob("features-*"))
    identity = json.loads((store / "index.json").read_text())["identity"]
    store = FeatureStore(store, gen.target.model.config.hidden_size, identity)
    return [store.sequence(i) for i in range(report["sequences"], len(store))]


def beats_untrained_and_drafts(gen, kind, folder, report, untrained) -> None:
    """Trained heads beat ``untrained`` ones held out (loss; top-1 of both heads by 0.08),
    and draft what the target keeps, through the engine."""
    trained = report["evaluation"]
    assert trained["loss"] < untrained["loss"]
    for k in range(2):
        assert trained["top1_by_head"][k] > untrained["top1_by_head"][k] + 0.08
    res = gen.generate(TEXT[:40], raw=True, max_new_tokens=40, method=kind, heads=str(folder),
                       ignore_eos=True)  # fmt: skip
    assert res.token_ids == gen.generate(TEXT[:40], raw=True, max_new_tokens=40, method="ar",
                                         ignore_eos=True).token_ids  # fmt: skip
    assert res.stats.accepted > 0


def medusa_config(corpus, **kw):
    return train_config("medusa", corpus, **kw)


def trainer(kind: str):
    from specdec.models.chimera_heads import ChimeraHeads
    from specdec.models.clover_heads import CloverHeads
    from specdec.models.falcon_heads import FalconHeads
    from specdec.models.hydra_heads import HydraHeads
    from specdec.train import chimera, clover, falcon, hydra, medusa

    return {"medusa": (medusa.train, MedusaHeads), "hydra": (hydra.train, HydraHeads),
            "clover": (clover.train, CloverHeads), "chimera": (chimera.train, ChimeraHeads),
            "falcon": (falcon.train, FalconHeads)}[kind]  # fmt: skip


def test_training_learns_the_target(tiny, tmp_path):  # noqa: F811 - the fixture
    from specdec.models.eagle_head import head_rows
    from specdec.train.medusa import evaluate, train

    gen, corpus, _ = tiny
    # the tiny model's states are 32 wide: a head needs a few blocks to learn much
    cfg = medusa_config(corpus, tokens=40_000, num_layers=4, lr=1e-2, held_out=0.2)
    report = train(gen, cfg, out=tmp_path / "m", work=tmp_path / "work", progress=False)
    heads = MedusaHeads.load(tmp_path / "m")
    acc = heads.config.accuracy
    assert len(acc) == 2 and all(len(row) == 4 for row in acc)
    # the same held-out sequences through untrained heads (each the identity: the target's
    # own next-token guess, one place early)
    model = gen.target.model
    held = [h.float() for _, h in held_out_store(gen, tmp_path / "work", report)]
    fresh = MedusaHeads.for_target(model, "fresh", 2, 4, heads.d2t)
    untrained = evaluate(fresh, model, head_rows(model, heads.d2t), held, cfg)
    beats_untrained_and_drafts(gen, "medusa", tmp_path / "m", report, untrained)
    trained = report["evaluation"]
    for k in range(2):
        assert trained["top4_by_head"][k] > untrained["top4_by_head"][k] + 0.15
    assert sum(acc[0]) == pytest.approx(trained["top4_by_head"][0], abs=1e-3)


def test_a_medusa_run_reads_the_features_an_eagle_run_made(tiny, tmp_path, monkeypatch):  # noqa: F811
    from test_eagle import train_config

    from specdec.train import eagle
    from specdec.train.medusa import train

    gen, corpus, _ = tiny
    heads = tmp_path / "heads" / "m"
    eagle.train(gen, train_config(corpus, tokens=200, feature_tokens=600), out=heads / "eagle",
                progress=False)  # fmt: skip

    def no_features(*a, **kw):
        raise AssertionError("features computed again")

    monkeypatch.setattr(gen.target, "forward", no_features)
    train(gen, medusa_config(corpus, tokens=200, feature_tokens=600), out=heads / "medusa",
          progress=False)  # fmt: skip
    assert not list((heads / "medusa-work").glob("features-*"))
    assert MedusaHeads.load(heads / "medusa").config.training["feature_tokens"] >= 600


@pytest.mark.parametrize("kind", ["medusa", "hydra", "clover", "chimera", "falcon"])
def test_resumed_training_equals_an_uninterrupted_run(tiny, tmp_path, kind):  # noqa: F811
    train, heads_class = trainer(kind)
    gen, corpus, _ = tiny
    # the interruption is a shorter budget: Falcon's glancing, which falls over the budget,
    # held constant so that both halves follow one schedule
    kw = {"glance_start": 0.3, "glance_end": 0.3} if kind == "falcon" else {}
    train(gen, train_config(kind, corpus, tokens=2000, **kw), out=tmp_path / "a",
          work=tmp_path / "wa", progress=False)  # fmt: skip
    train(gen, train_config(kind, corpus, tokens=1000, **kw), out=tmp_path / "b",
          work=tmp_path / "wb", progress=False)  # fmt: skip
    train(gen, train_config(kind, corpus, tokens=2000, **kw), out=tmp_path / "b",
          work=tmp_path / "wb", resume=True, progress=False)  # fmt: skip
    a, b = heads_class.load(tmp_path / "a"), heads_class.load(tmp_path / "b")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize(
    "kind, args, message",
    [
        ("medusa", ["--minutes", "0"], "--minutes must be > 0"),
        ("medusa", ["--tokens", "10", "--heads", "0"], "--heads, --layers and --top-k must be"),
        ("medusa", ["--tokens", "10", "--data", "nowhere.txt"], "neither a source"),
        ("hydra", ["--minutes", "0"], "--minutes must be > 0"),
        ("hydra", ["--tokens", "10", "--layers", "0"], "--heads, --layers and --top-k must be"),
        ("hydra", ["--tokens", "10", "--dropout", "1"], "--dropout must be in [0, 1)"),
        ("clover", ["--tokens", "10", "--heads", "0"], "--heads, --layers and --top-k must be"),
        ("chimera", ["--minutes", "0"], "--minutes must be > 0"),
        ("falcon", ["--tokens", "10", "--block", "0"], "--block must be >= 1"),
        ("falcon", ["--tokens", "10", "--glance", "0.1", "0.5"], "--glance must be two shares"),
    ],
)
def test_train_cli_refuses_bad_input(tiny, tmp_path, monkeypatch, capsys, kind, args, message):  # noqa: F811
    from specdec.cli import main

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    code = main(["train", kind, "--model", str(tiny[0].name), "--quant", "none", "--quiet",
                 *args])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not list((tmp_path / "cache").glob(f"heads/*/{kind}/config.json"))


def test_typical_acceptance_keeps_what_it_promises():
    """The target's likeliest token always passes, a token at or below the threshold never
    does, the longest passing path is kept (ties: the likelier), and the token after it is
    sampled from the target's distribution there."""
    from specdec.speculation.tree import DraftTree
    from specdec.speculation.verifiers.typical import TypicalVerifier, typical_thresholds

    v = TypicalVerifier(epsilon=0.09, delta=0.3)
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = torch.softmax(torch.randn(8, generator=g) * 3, -1)
        thr = float(typical_thresholds(p[None], 0.09, 0.3)[0])
        tree = DraftTree(list(range(8)), [-1] * 8)  # every token as a child of the root
        rows = torch.cat([p[None], torch.full((8, 8), 1 / 8)])
        out = v.verify(tree, rows, params, g)
        passing = [t for t in range(8) if p[t] > thr]
        assert int(p.argmax()) in passing  # the target's greedy token passes
        assert len(out.path) == 1 and tree.tokens[out.path[0]] in passing
    # the longest passing path wins over a likelier short one; among equals, the likelier
    tree = DraftTree([0, 1, 2], [-1, -1, 1])
    p = torch.tensor([[0.6, 0.4, 0.0], [1 / 3] * 3, [0.0, 0.0, 1.0], [1 / 3] * 3])
    assert v.verify(tree, p, params, g).path == [1, 2]
    tree = DraftTree([0, 1], [-1, -1])
    p = torch.tensor([[0.3, 0.7, 0.0], [1 / 3] * 3, [1 / 3] * 3])
    assert v.verify(tree, p, params, g).path == [1]
    # nothing passes: the token is the target's own sample at the root
    tree = DraftTree([2], [-1])
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3] * 3])
    counts = [0, 0, 0]
    for _ in range(2000):
        out = v.verify(tree, p, params, g)
        assert out.path == []
        counts[out.bonus] += 1
    assert counts[2] == 0 and abs(counts[0] / 2000 - 0.5) < 0.05
    # greedy: exactly the argmax
    greedy = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = v.verify(DraftTree([1], [-1]), greedy, SamplingParams(), None)
    assert out.path == [0] and out.bonus == 2


def test_typical_acceptance_is_opt_in_and_labelled_lossy(capsys):
    from specdec.cli import main

    method = get_method("medusa")
    assert method.lossless and method.lossless_with({})
    assert not method.lossless_with({"acceptance": "typical"})
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "medusa  (lossless; LOSSY with acceptance=typical" in out
    with pytest.raises(Exception, match="epsilon and delta must be at most 1"):
        method.parse({"acceptance": "typical", "epsilon": "2"})


def test_typical_acceptance_leaves_greedy_output_unchanged(tmp_path):
    model = random_transformer("llama", seed=3, vocab=24).double()
    heads = random_heads(model, seed=4)
    heads.save(tmp_path / "m")
    from specdec.engine import Engine, Generation

    tok = CharTokenizer(vocab=24)
    ctx = BuildContext(tokenizer=tok, vocab_size=24, target=NativeTarget(model))
    drafter = get_method("medusa").build(ctx, {"heads": str(tmp_path / "m"), "acceptance": "typical"})
    engine = Engine(NativeTarget(model), tok)
    runs = []
    for d in (drafter, None):
        res = Generation()
        for _ in engine.stream([3, 9, 4, 1], max_new_tokens=30, drafter=d, result=res):
            pass
        runs.append(res.token_ids)
    assert runs[0] == runs[1]


def test_vllm_export_computes_what_the_heads_compute(tmp_path):
    """The exported checkpoint, read as vLLM's Medusa reads it (blocks with their biases on
    the target's normed last state, one LM head at the token map's rows, logits scattered
    into the target's vocabulary), gives each head's logits of ours; a used folder and
    heads of another target are refused."""
    from safetensors.torch import load_file

    from specdec.models.medusa_format import export_medusa

    model = random_transformer("qwen2", seed=5, vocab=24).double()
    heads = random_heads(model, seed=6, subset=15, heads=3, layers=2)
    export_medusa(heads, model, tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    w = load_file(str(tmp_path / "v" / "model.safetensors"))
    assert config["model_type"] == "medusa" and config["original_lm_head"]
    assert config["medusa_fc_bias"] and config["truncated_vocab_size"] == 15
    last = torch.randn(4, model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        ours = heads.double()(model, last)  # (rows, K, d)
        normed = model.norm(last)
        for k in range(config["num_heads"]):
            x = normed
            for j in range(config["num_hidden_layers"]):
                lin = w[f"blocks.{k}.layers.{j}.weight"].double(), w[f"blocks.{k}.layers.{j}.bias"]
                x = x + torch.nn.functional.silu(x @ lin[0].T + lin[1].double())
            theirs = torch.full((4, config["vocab_size"]), -torch.inf, dtype=torch.float64)
            theirs[:, w["token_map"]] = x @ w["lm_heads.0.weight"].double().T
            want = torch.full_like(theirs, -torch.inf)
            want[:, heads.d2t] = ours[:, k] @ model.lm_head.weight[heads.d2t].T
            assert torch.allclose(theirs, want, atol=1e-5)
    with pytest.raises(HeadError, match="not empty"):
        export_medusa(heads, model, tmp_path / "v")
    other = random_transformer("qwen2", seed=5, vocab=32).double()
    with pytest.raises(HeadError):
        export_medusa(heads, other, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_export_cli_says_what_is_missing(tmp_path, capsys):
    from specdec.cli import main

    code = main(["export", "medusa", "--heads", str(tmp_path / "none"), "--out",
                 str(tmp_path / "v"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "no Medusa heads at" in err and "Traceback" not in err


def test_the_tree_pays_for_its_guessing_or_is_not_drafted(tmp_path):
    """Sized on the pass-cost curve with the measured guessing time: guessing that costs
    more than the best tree gains drafts nothing (not guessing is charged no guessing
    time); cheap guessing drafts; the first timing (warm-up) sizes nothing."""
    from specdec.models.pass_cost import PassCost

    model = random_transformer("llama", seed=3, vocab=24).double()
    heads = random_heads(model, seed=4, subset=15)
    heads.config.accuracy = [[0.3, 0.1, 0.05], [0.2, 0.1, 0.05], [0.1, 0.05, 0.02]]
    heads.save(tmp_path / "m")
    cost = PassCost({1: 10.0, 64: 30.0})  # ms
    ctx = BuildContext(tokenizer=CharTokenizer(vocab=24), vocab_size=24,
                       target=NativeTarget(model), pass_cost=lambda: cost)  # fmt: skip
    drafter = get_method("medusa").build(ctx, {"heads": str(tmp_path / "m")})
    untimed = drafter.size
    assert untimed > 0
    now = time.perf_counter()
    drafter.timed(now - 1.0)  # warm-up: 1 s
    assert drafter.size == untimed
    drafter.timed(now - 0.050)  # 50 ms of guessing against 10 ms steps: nothing pays
    assert drafter.size == 0 and drafter.draft_ms == pytest.approx(50, rel=0.1)
    cheap = get_method("medusa").build(ctx, {"heads": str(tmp_path / "m")})
    cheap.timed(time.perf_counter())
    cheap.timed(time.perf_counter() - 0.0005)  # half a millisecond: a tree pays
    assert 0 < cheap.size
