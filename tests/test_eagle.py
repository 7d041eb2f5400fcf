"""EAGLE heads: the runtime computes what training optimises, drafts read the target's
committed features, head files are checked, and training learns and resumes exactly.

Greedy exactness of `eagle` (chains, static and dynamic trees) is in the contract suite
(test_contract.py) and its sampling in test_sampling_at_depth.py.
"""

import random

import pytest
import torch
from random_models import CharTokenizer, random_transformer

from specdec.engine import Engine, Generation
from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import EagleHead, HeadError
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import BuildContext
from specdec.speculation.drafters.eagle import HeadDraft
from specdec.speculation.methods import get_method


def random_head(model, seed=0, subset=None, scale=0.3, version=1):
    """A head with weights large enough that its layer matters (float64, like ``model``);
    version 3 reads every layer's input and the last layer's output."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = None
    if subset:
        tokens = torch.randperm(vocab, generator=g)[:subset]
    layers = tuple(range(model.config.num_layers + 1)) if version == 3 else ()
    head = EagleHead.for_target(model, "random", tokens, seed=seed, version=version,
                                feature_layers=layers)  # fmt: skip
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif version == 3:  # norms away from 1 and from each other
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return head.to(torch.float64)


def target_features(model, tokens, head=None):
    """The target's hidden states at every position of ``tokens`` (a fresh pass), at the
    layers ``head`` reads (default: the last layer's output)."""
    target = NativeTarget(model)
    layers = head.config.feature_layers if head is not None else None
    _, hidden = target.forward(tokens, return_hidden=True, hidden_layers=layers)
    return hidden.clone()  # not an inference tensor: the head's layers track gradients


def head_inputs(model, hidden, head=None):
    if head is None:
        feats = model.norm(hidden)
    else:
        feats = head.committed_features(model, hidden)
    return torch.cat([feats.new_zeros(1, feats.shape[1]), feats[:-1]])


def test_hidden_layers_are_the_residual_stream_entering_each_layer():
    model = random_transformer("llama", seed=2, vocab=20)
    tokens = [1, 5, 2, 7]
    n = model.config.num_layers
    _, last = NativeTarget(model).forward(tokens, return_hidden=True)
    _, every = NativeTarget(model).forward(
        tokens, return_hidden=True, hidden_layers=list(range(n + 1))
    )
    d = model.config.hidden_size
    torch.testing.assert_close(every[:, :d], model.embed(torch.tensor(tokens)))
    torch.testing.assert_close(every[:, n * d :], last)
    for i in range(1, n):  # the first i layers' output is layer i's input
        _, part = NativeTarget(model).forward(tokens, return_hidden=True, layers=list(range(i)))
        torch.testing.assert_close(every[:, i * d : (i + 1) * d], part)
    with pytest.raises(ValueError, match="not one of"):
        NativeTarget(model).forward(tokens, return_hidden=True, hidden_layers=[n + 1])


@pytest.mark.parametrize("version,subset", [(1, None), (1, 7), (3, None), (3, 7)])
def test_runtime_computes_what_training_optimises(version, subset):
    model = random_transformer("qwen2", seed=3, vocab=40)
    head = random_head(model, seed=1, subset=subset, version=version)
    tokens = [random.Random(0).randrange(40) for _ in range(12)]
    hidden = target_features(model, tokens, head)
    inputs = head_inputs(model, hidden, head)
    steps = head.unrolled_forward(model, torch.tensor(tokens), inputs, 3)
    for cut in (1, 5, 9):  # committed tokens[:cut]; then drafted tokens[cut], tokens[cut + 1]
        draft = HeadDraft(head, model)
        draft.add_features(hidden[: cut - 1])
        got = [draft.forward(tokens[:cut])[-1]]
        got.append(draft.forward([tokens[cut]])[-1])
        got.append(draft.forward([tokens[cut + 1]])[-1])
        for depth, row in enumerate(got):  # row after slot cut - 1 + depth
            want = steps[depth][1][cut - 1 + depth]
            torch.testing.assert_close(row[head.d2t], want, rtol=1e-9, atol=1e-9)
            outside = torch.ones(40, dtype=torch.bool)
            outside[head.d2t] = False
            assert torch.isinf(row[outside]).all()


def context(model, tok, head_dir, cost=None):
    return BuildContext(
        tokenizer=tok,
        vocab_size=model.config.vocab_size,
        target=NativeTarget(model),
        pass_cost=None if cost is None else (lambda: cost),
    )


@pytest.mark.parametrize(
    "options,version",
    [
        ({"tree": "none"}, 1),
        ({"tree": "none", "num_draft_tokens": 1}, 1),
        ({"tree": "2,2,1"}, 1),
        ({"tree": "none"}, 3),
        ({"tree": "2,2,1"}, 3),
    ],
)
def test_each_draft_reads_the_committed_features(options, version, tmp_path):
    """The first drafted token is the head's prediction on the committed sequence with the
    target's own features: the runtime's bookkeeping of features across steps (accepted
    drafts run again with real features) is right."""
    model = random_transformer("llama", seed=5, vocab=24)
    head = random_head(model, seed=2, version=version)
    head.save(tmp_path / "head")
    tok = CharTokenizer(vocab=24)
    drafter = get_method("eagle").build(
        context(model, tok, tmp_path), {"head": str(tmp_path / "head"), **options}
    )
    checked = []
    propose = drafter.propose

    def checking(state):
        tree = propose(state)
        if not len(tree):  # the last token: nothing to draft
            return tree
        toks = torch.tensor(state.tokens)
        hidden = target_features(model, state.tokens[:-1], head)
        inputs = head_inputs(model, torch.cat([hidden, hidden[-1:]]), head)  # last row unused
        _, logits = head.sequence_forward(model, toks, inputs)
        assert tree.tokens[0] == int(head.d2t[logits[-1].argmax()])
        checked.append(len(state.tokens))
        return tree

    drafter.propose = checking
    res = Generation()
    engine = Engine(NativeTarget(model, capacity=8), tok)
    for _ in engine.stream([3, 1, 4, 1, 5], max_new_tokens=40, drafter=drafter, result=res,
                           ignore_eos=True):  # fmt: skip
        pass
    assert len(checked) >= res.stats.target_passes - 2 and res.stats.new_tokens == 40


def test_head_files(tmp_path):
    model = random_transformer("qwen2", seed=1, vocab=30)
    head = random_head(model, subset=9).float()
    folder = head.save(tmp_path / "h")
    again = EagleHead.load(folder)
    for (k, v), (k2, v2) in zip(head.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    # another model: refused with the reason
    other = random_transformer("qwen2", seed=1, vocab=31)
    with pytest.raises(HeadError, match="vocab_size"):
        HeadDraft(again, other)
    # damaged files
    weights = folder / "head.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadError, match="damaged"):
        EagleHead.load(folder)
    weights.write_bytes(b"")
    with pytest.raises(HeadError):
        EagleHead.load(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(HeadError, match="unreadable"):
        EagleHead.load(folder)
    with pytest.raises(HeadError, match="no EAGLE head"):
        EagleHead.load(tmp_path / "nothing")


def test_eagle_without_a_head_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("qwen2", seed=1, vocab=30)
    ctx = BuildContext(
        tokenizer=CharTokenizer(30), vocab_size=30, target=NativeTarget(model), model="tiny"
    )
    with pytest.raises(InvalidRequestError, match="specdec train eagle --model tiny"):
        get_method("eagle").build(ctx, {})
    no_target = BuildContext(tokenizer=CharTokenizer(30), vocab_size=30)
    with pytest.raises(InvalidRequestError, match="native backend"):
        get_method("eagle").build(no_target, {})


# ---------------------------------------------------------------------------- training
TEXT = (
    "the cat sat on the mat. the dog sat on the log. then the cat and the dog ran in "
    "the sun, and the sun set on them. "
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model in a safetensors folder, loaded as users load one; a corpus beside it."""
    from fixtures import save_hf_folder, tiny_hf_model

    from specdec.api import Generator

    root = tmp_path_factory.mktemp("eagle-train")
    folder = save_hf_folder(tiny_hf_model("qwen2", seed=0).float(), root / "tiny")
    gen = Generator.load(str(folder), quant="none", dtype="float32", progress=False)
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 40)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(f'{{"prompt": "tell me about the {w}"}}\n' for w in TEXT.split()[:12])
    )
    return gen, corpus, prompts


def train_config(corpus, **kw):
    from specdec.train.eagle import TrainConfig

    base = dict(data=str(corpus), minutes=None, tokens=3000, feature_tokens=1200, seq_len=48,
                respond=0, draft_vocab=200, unroll=2, lr=3e-3, checkpoint_s=1e9,
                engine_prompts=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("version", [1, 3])
def test_training_learns_the_target(tiny, tmp_path, version):
    from specdec.models.eagle_head import head_rows
    from specdec.train.eagle import FeatureStore, evaluate, stored_layers, train

    gen, corpus, _ = tiny
    cfg = train_config(corpus, tokens=12_000, engine_prompts=1, engine_tokens=20,
                       version=version)  # fmt: skip
    report = train(gen, cfg, out=tmp_path / "head", work=tmp_path / "work", progress=False)
    trained = report["evaluation"]
    assert report["engine"]["prompts"] == 1 and report["engine"]["identical"] == 1
    # the same held-out sequences through an untrained head
    model = gen.target.model
    head = EagleHead.load(tmp_path / "head")
    assert head.version == version
    fresh = EagleHead.for_target(model, "fresh", head.d2t, seed=1, version=version)
    store = next((tmp_path / "work").glob("features-*"))
    width = model.config.hidden_size * len(stored_layers(version, model.config.num_layers))
    store = FeatureStore(store, width, json_identity(store))
    held = list(range(report["sequences"], len(store)))
    untrained = evaluate(fresh, model, head_rows(model, head.d2t), store, held, cfg)
    assert trained["loss"] < (0.7 if version == 1 else 0.9) * untrained["loss"]
    assert trained["top1_by_depth"][0] > untrained["top1_by_depth"][0] + 0.2
    assert trained["top1_by_depth"][1] > untrained["top1_by_depth"][1]
    # and it drafts what the target keeps, through the engine
    res = gen.generate(TEXT[:40], raw=True, max_new_tokens=40, method="eagle",
                       head=str(tmp_path / "head"), tree="none", ignore_eos=True)  # fmt: skip
    assert res.token_ids == gen.generate(TEXT[:40], raw=True, max_new_tokens=40, method="ar",
                                         ignore_eos=True).token_ids  # fmt: skip
    assert res.stats.accepted > 0


def json_identity(folder):
    import json

    return json.loads((folder / "index.json").read_text())["identity"]


def test_resumed_training_equals_an_uninterrupted_run(tiny, tmp_path):
    from specdec.train.eagle import train

    gen, _, prompts = tiny  # prompts answered by the target (self-distillation) too
    whole = train_config(prompts, respond=8, tokens=2000, feature_tokens=400)
    train(gen, whole, out=tmp_path / "a", work=tmp_path / "wa", progress=False)
    half = train_config(prompts, respond=8, tokens=1000, feature_tokens=400)
    train(gen, half, out=tmp_path / "b", work=tmp_path / "wb", progress=False)
    train(gen, whole, out=tmp_path / "b", work=tmp_path / "wb", resume=True, progress=False)
    a, b = EagleHead.load(tmp_path / "a"), EagleHead.load(tmp_path / "b")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert a.config.training["trained_tokens"] == b.config.training["trained_tokens"]


def test_a_version_3_run_reuses_the_answers_a_version_1_run_made(tiny, tmp_path, monkeypatch):
    from specdec.train.eagle import FeatureStore, stored_layers, train

    gen, _, prompts = tiny
    heads = tmp_path / "heads" / "m"
    cfg = train_config(prompts, respond=8, tokens=200, feature_tokens=200)
    train(gen, cfg, out=heads / "eagle", progress=False)

    def no_answers(*a, **kw):
        raise AssertionError("answered again")

    monkeypatch.setattr(gen.engine, "stream", no_answers)
    train(gen, train_config(prompts, respond=8, tokens=200, feature_tokens=200, version=3),
          out=heads / "eagle3", progress=False)  # fmt: skip
    one, three = (next((heads / w).glob("features-*")) for w in ("eagle-work", "eagle3-work"))
    one = FeatureStore(one, gen.target.model.config.hidden_size, json_identity(one))
    c = gen.target.model.config
    width = c.hidden_size * len(stored_layers(3, c.num_layers))
    three = FeatureStore(three, width, json_identity(three))
    assert len(one) == len(three) > 1
    assert all(torch.equal(one.sequence(i)[0], three.sequence(i)[0]) for i in range(len(one)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--minutes", "0"], "--minutes must be > 0"),
        (["--tokens", "-3"], "--tokens must be > 0"),
        (["--tokens", "10", "--respond", "400"], "--respond must be in"),
        (["--tokens", "10", "--data", "nowhere.txt"], "neither a source"),
    ],
)
def test_train_cli_refuses_bad_input(tiny, tmp_path, monkeypatch, capsys, args, message):
    from specdec.cli import main

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    gen = tiny[0]
    model = str(gen.name)
    code = main(["train", "eagle", "--model", model, "--quant", "none", "--quiet", *args])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not list((tmp_path / "cache").glob("heads/*/eagle/config.json"))


def test_training_prompts_are_never_benchmark_questions():
    from specdec.bench.questions import load_dataset
    from specdec.train.corpus import HELD_OUT, held_out_prompts

    trained = {source for source, _ in held_out_prompts()}
    for name, skip in HELD_OUT.items():
        benched = load_dataset(name).select(limit=skip).questions
        assert benched and not {f"{name}:{q.question_id}" for q in benched} & trained
    assert len(trained) > 1000


def test_a_feature_store_keeps_what_its_index_lists(tmp_path):
    from specdec.train.features import FeatureStore

    store = FeatureStore(tmp_path, 4, "model-a")
    store.append([1, 2, 3], torch.arange(12.0).view(3, 4), "x")
    with open(tmp_path / "tokens.bin", "ab") as f:  # a run cut short mid-append
        f.write(b"\x07\x00")
    again = FeatureStore(tmp_path, 4, "model-a")
    assert len(again) == 1 and again.tokens == 3
    tokens, hidden = again.sequence(0)
    assert tokens.tolist() == [1, 2, 3] and torch.equal(hidden, torch.arange(12.0).view(3, 4))
    again.append([4], torch.ones(1, 4))
    assert again.sequence(1)[0].tolist() == [4]
    assert len(FeatureStore(tmp_path, 4, "model-b")) == 0  # another model's: started again


def test_speculators_export_reads_back_to_the_same_drafts(tmp_path, capsys):
    """An EAGLE-3 head written in vLLM's format (speculators) and read back drafts the same
    logits; the files say what vLLM needs; what cannot be exported or read is refused."""
    import json

    from specdec.cli import main
    from specdec.models.speculators_format import export_head, import_head

    model = random_transformer("qwen2", seed=3, vocab=40)
    head = random_head(model, seed=4, subset=9, version=3).float()
    head.save(tmp_path / "ours")
    assert main(["export", "eagle", "--head", str(tmp_path / "ours"), "--out",
                 str(tmp_path / "vllm"), "--verifier", "org/model"]) == 0  # fmt: skip
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 9
    assert config["speculators_config"]["verifier"]["name_or_path"] == "org/model"
    assert config["eagle_aux_hidden_state_layer_ids"] == list(head.config.feature_layers)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    assert weights["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * model.config.hidden_size
    assert (weights["d2t"] + torch.arange(9)).tolist() == head.d2t.tolist()
    assert int(weights["t2d"].sum()) == 9 and "embed_tokens.weight" not in weights
    again = import_head(tmp_path / "vllm")
    for key, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    tokens = [random.Random(1).randrange(40) for _ in range(10)]
    hidden = target_features(model.float(), tokens, head)
    drafts = []
    for h in (head, again):
        draft = HeadDraft(h, model.float())
        draft.add_features(hidden[:-1])
        drafts.append(torch.stack([draft.forward(tokens)[-1], draft.forward([5])[-1]]))
    assert torch.equal(drafts[0], drafts[1])
    # `--method eagle` reads the exported folder as it is
    ctx = context(model.float(), CharTokenizer(vocab=40), tmp_path)
    drafter = get_method("eagle").build(ctx, {"head": str(tmp_path / "vllm"), "tree": "none"})
    assert drafter.feature_layers == head.config.feature_layers
    # refused: an EAGLE-1 head, a folder in use, a damaged or foreign checkpoint
    v1 = random_head(model, version=1).float()
    with pytest.raises(HeadError, match="only EAGLE-3"):
        export_head(v1, tmp_path / "v1", "x")
    assert main(["export", "eagle", "--head", str(tmp_path / "ours"), "--out",
                 str(tmp_path / "vllm")]) != 0  # fmt: skip
    assert "not empty" in capsys.readouterr().err
    config["norm_output"] = True
    (tmp_path / "vllm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadError, match="norm_output"):
        import_head(tmp_path / "vllm")
    config["norm_output"] = False
    (tmp_path / "vllm" / "config.json").write_text(json.dumps(config))
    weights.pop("fc.weight")
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "vllm" / "model.safetensors"))
    with pytest.raises(HeadError, match="fc.weight"):
        import_head(tmp_path / "vllm")
    other = random_transformer("qwen2", seed=3, vocab=41)
    with pytest.raises(HeadError, match="vocab_size"):
        HeadDraft(again, other)
    # bfloat16: half the bytes, the head rounded
    assert main(["export", "eagle", "--head", str(tmp_path / "ours"), "--out",
                 str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0  # fmt: skip
    half = import_head(tmp_path / "half")
    w = head.state_dict()["layer.ffn.w2.weight"]
    assert torch.equal(half.state_dict()["layer.ffn.w2.weight"], w.bfloat16().float())
