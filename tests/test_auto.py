"""`auto` as the engine runs it: each step charged to the drafter that ran, the record
kept in the cache and read back, the per-drafter report, and what it refuses."""

from __future__ import annotations

import json

import pytest
from random_models import CharTokenizer, random_transformer

from specdec.engine import Engine, Generation
from specdec.errors import InvalidRequestError
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.auto import Arm, AutoDrafter, read_record, summarise_record
from specdec.speculation.drafters.base import BuildContext, Drafter, DraftState
from specdec.speculation.methods import get_method
from specdec.speculation.step_bandit import ALL
from specdec.speculation.tree import DraftTree


class Clock:
    """Time that passes only when told: drafters and target passes are priced exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedDrafter(Drafter):
    """Proposes the next ``k`` tokens of ``script`` (right) or tokens off by one (wrong),
    at ``cost`` seconds a proposal."""

    def __init__(self, script, k, right, cost, clock, model=False) -> None:
        self.script, self.k, self.right, self.cost, self.clock = script, k, right, cost, clock
        self.runs_a_model = model
        self.proposed = 0
        self.read = 0  # prompt tokens read by prepare

    def prepare(self, tokens) -> None:
        self.read += len(tokens)
        self.clock.now += 0.1 * len(tokens) if self.runs_a_model else 0.0

    def propose(self, state: DraftState) -> DraftTree:
        self.clock.now += self.cost
        self.proposed += 1
        done = len(state.tokens) - state.prompt_len
        nxt = self.script[done : done + min(self.k, state.budget - 1)]
        return DraftTree.chain([t if self.right else (t + 1) % 47 for t in nxt])


class TimedTarget(NativeTarget):
    """A target pass takes 1 second on ``clock``."""

    clock: Clock | None = None

    def forward(self, *args, **kwargs):
        if self.clock is not None:
            self.clock.now += 1.0
        return super().forward(*args, **kwargs)


def setup(clock: Clock):
    model = random_transformer("qwen2", seed=3, vocab=48)
    tok = CharTokenizer(vocab=1000)  # no EOS in the vocabulary: every run is full length
    prompt = [5, 6, 7, 8]
    target = TimedTarget(model, capacity=8)
    engine = Engine(target, tok)
    ref = Generation()
    for _ in engine.stream(prompt, max_new_tokens=200, result=ref):
        pass
    target.clock = clock
    return engine, prompt, ref


def run(engine, prompt, drafter, n=200):
    res = Generation()
    for _ in engine.stream(prompt, max_new_tokens=n, drafter=drafter, result=res):
        pass
    return res


def auto_with(script, clock, identity=None, **kw):
    # with a target pass of 1 s: the right drafter runs a model (1.5 s a proposal, 4 tokens
    # right: 5 tokens in 2.51 s); the wrong one is cheap and peeked (0.01 s, nothing right:
    # 1 token in 1.01 s, as plain decoding)
    right = ScriptedDrafter(script, 4, True, 1.5, clock, model=True)
    wrong = ScriptedDrafter(script, 4, False, 0.01, clock)
    auto = AutoDrafter([Arm("good", right, peek=False), Arm("bad", wrong, peek=True)],
                       identity=identity, **kw)  # fmt: skip
    auto.clock = clock
    return auto, right, wrong


def test_learns_the_drafter_that_pays_and_reports_each_part(tmp_path):
    clock = Clock()
    engine, prompt, ref = setup(clock)
    auto, right, wrong = auto_with(ref.token_ids, clock)
    res = run(engine, prompt, auto)
    assert res.token_ids == ref.token_ids
    used = res.stats.drafters
    assert set(used) <= {"good", "bad", "ar"} and used["good"]["steps"] >= 0.8 * sum(
        u["steps"] for u in used.values()
    )
    assert used["good"]["tau"] == pytest.approx(5.0, abs=0.3)
    # each step charged end to end: the good one's steps took 1.5 s to draft, the target's
    # pass 1 s, and the peek of the cheap one 0.01 s
    assert used["good"]["seconds"] == pytest.approx(used["good"]["steps"] * 2.51, rel=1e-6)
    assert wrong.proposed == sum(u["steps"] for u in used.values())  # peeked every step
    assert right.proposed == used["good"]["steps"]  # a model's drafter: only when chosen
    assert sum(u["tokens"] for u in used.values()) == res.stats.new_tokens - 1  # + prefill


def test_reading_the_prompt_is_weighed_once_measured():
    clock = Clock()
    engine, prompt, ref = setup(clock)
    auto, right, _ = auto_with(ref.token_ids, clock)
    used = run(engine, prompt, auto, n=200).stats.drafters
    # read once (4 prompt tokens + the first one, 0.5 s), not charged to its steps
    assert right.read == 4 and auto.catch_up["good"] == (4, pytest.approx(0.4))
    assert used["good"]["seconds"] == pytest.approx(used["good"]["steps"] * 2.51, rel=1e-6)
    # a prompt of 60 tokens (6 s to read) and 8 tokens to go: plain decoding pays better
    long = (prompt * 15)[:60]
    again = run(engine, long, auto, n=8).stats.drafters
    assert "good" not in again and right.read == 4
    # with 200 to go it pays (200 / (200 / 2 + 6) > 1)
    assert "good" in run(engine, long, auto, n=200).stats.drafters


def test_the_record_is_kept_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    clock = Clock()
    engine, prompt, ref = setup(clock)
    auto, _, _ = auto_with(ref.token_ids, clock, identity="m|file|float32|none|cpu")
    run(engine, prompt, auto, n=60)
    data = read_record(auto.record)
    assert data["identity"] == "m|file|float32|none|cpu"
    summary = summarise_record(data)["greedy"]
    assert summary["good"]["tau"] > 4 and summary["good"]["tokens_per_s"] > 1.5
    # a new process starts from the record: no arm tried first for want of one, the good
    # one at once and most of the time
    again, right, _ = auto_with(ref.token_ids, clock, identity="m|file|float32|none|cpu")
    assert again.bandits["greedy"].choose({"good": ALL, "bad": "4-7", "ar": ALL}) == "good"
    used = run(engine, prompt, again, n=60).stats.drafters
    assert used["good"]["steps"] >= 0.8 * sum(u["steps"] for u in used.values())
    # no identity, or remember=false: nothing written
    assert auto_with([], Clock())[0].record is None


def test_a_damaged_record_is_learnt_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    auto, _, _ = auto_with([], Clock(), identity="m|x")
    auto.record.parent.mkdir(parents=True)
    auto.record.write_text("{not json")
    fresh, _, _ = auto_with([], Clock(), identity="m|x")
    assert all(not b.tallies for b in fresh.bandits.values())
    auto.record.write_text(json.dumps({"greedy": {"good\t*": [1, 5, "x"]}}))
    assert summarise_record(read_record(auto.record)) == {}


def test_a_request_read_only_in_part_still_reports_and_keeps_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    engine, prompt, ref = setup(Clock())
    auto, _, _ = auto_with(ref.token_ids, Clock(), identity="m|y")
    res = Generation()
    stream = engine.stream(prompt, max_new_tokens=100, drafter=auto, result=res)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert res.stats.drafters and auto.record.exists()


def test_build_through_the_method_table():
    draft = NativeTarget(random_transformer("qwen2", seed=2, vocab=48))
    tok = CharTokenizer(48)
    asked = []

    def load_draft(spec, same_tokenizer=True, quant=None):
        asked.append((spec, quant))
        return draft

    ctx = BuildContext(tokenizer=tok, vocab_size=48, load_draft=load_draft)
    auto = get_method("auto").build(
        ctx, {"drafters": "pld,recycle,draft", "draft_model": "a,b", "draft_quant": "int4,gguf"}
    )
    assert list(auto.arms) == [
        "pld", "recycle", "draft:a:int4", "draft:a:gguf", "draft:b:int4", "draft:b:gguf", "ar"
    ]  # fmt: skip
    assert asked == [("a", "int4"), ("a", "gguf"), ("b", "int4"), ("b", "gguf")]
    assert [a.peek for a in auto.arms.values()] == [True, True, False, False, False, False, False]
    # a draft model named is among the arms, whatever drafters says
    named = get_method("auto").build(ctx, {"drafters": "pld", "draft_model": "a"})
    assert list(named.arms) == ["pld", "draft:a", "ar"]
    for bad, message in [
        ({"drafters": "auto"}, "among autos"),
        ({"drafters": ""}, "names no method"),
        ({"drafters": "pld,nope"}, "unknown method"),
        ({"memory": "1.5"}, "<= 1"),
        ({"draft_quant": "int4,int5"}, "got 'int5'"),
        ({"drafters": "draft", "draft_model": "a", "tree": "2,2"}, None),  # fine: a static tree
    ]:
        if message is None:
            get_method("auto").build(ctx, bad)
            continue
        with pytest.raises(InvalidRequestError, match=message):
            get_method("auto").build(ctx, bad)
    with pytest.raises(InvalidRequestError, match="plain decoding"):
        AutoDrafter([Arm("ar", Drafter(), peek=False)])


def test_the_auto_command_lists_and_forgets_records(tmp_path, monkeypatch, capsys):
    from specdec.cli import main

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert main(["auto"]) == 0
    assert "no records" in capsys.readouterr().out
    clock = Clock()
    engine, prompt, ref = setup(clock)
    for identity in ("m1|file|float32|gguf|cpu", "m2|file|bfloat16|none|cpu"):
        auto, _, _ = auto_with(ref.token_ids, clock, identity=identity)
        run(engine, prompt, auto, n=30)
    assert main(["auto"]) == 0
    out = capsys.readouterr().out
    assert "m1  (file, float32, gguf, cpu)" in out and "m2  (" in out and "    good " in out
    assert main(["auto", "--model", "m1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["identity"] for r in rows] == ["m1|file|float32|gguf|cpu"]
    assert rows[0]["arms"]["greedy"]["good"]["tau"] > 4
    assert main(["auto", "--model", "m1", "--reset"]) == 0
    assert "forgot 1 record" in capsys.readouterr().out
    assert main(["auto", "--json"]) == 0
    assert [r["identity"] for r in json.loads(capsys.readouterr().out)] == [
        "m2|file|bfloat16|none|cpu"
    ]


def test_a_trained_head_is_an_arm_and_its_features_follow_every_step(tmp_path, monkeypatch):
    """With a head in the cache for the model, 'eagle' is an arm; chosen at random steps
    (so it often catches up after steps it did not run), the output is the target's."""
    from test_contract import eagle_head, switching

    from specdec.models.eagle_head import EagleHead, head_folder

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    model = random_transformer("qwen2", seed=4, vocab=32)
    tok = CharTokenizer(32)
    ctx = BuildContext(tokenizer=tok, vocab_size=32, target=NativeTarget(model), model="tiny")
    options = {"drafters": "pld,eagle", "remember": False}
    without = get_method("auto").build(ctx, options)
    assert set(without.arms) == {"pld", "ar"}  # no head trained: no arm, no error
    EagleHead.load(eagle_head(model, seed=3)).to(model.dtype).save(head_folder("tiny"))
    drafter = switching(get_method("auto").build(ctx, options), seed=1)
    assert set(drafter.arms) == {"pld", "eagle", "ar"}
    prompt = [1, 2, 3, 1, 2, 3, 4]
    ref = Generation()
    got = Generation()
    for result, d in ((ref, None), (got, drafter)):
        for _ in Engine(NativeTarget(model, capacity=8), tok).stream(
            prompt, max_new_tokens=60, drafter=d, result=result, ignore_eos=True
        ):
            pass
    assert got.token_ids == ref.token_ids
    assert got.stats.drafters["eagle"]["steps"] > 3
