"""Continuous batching: several sequences in one target pass, each exactly as alone."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from random_models import CharTokenizer, perturbed_copy, random_transformer, tree_mask_and_depths
from test_contract import FACTORIES, context, greedy_case, make_drafter, run
from test_quant_model import quantised_model

from specdec.batching import BatchEngine, BatchRequest
from specdec.engine import Decoding, Generation, run_pass
from specdec.models import transformer
from specdec.models.pass_cost import PassCost
from specdec.models.target import NativeTarget
from specdec.models.transformer import Segment
from specdec.speculation.drafters.base import NoDrafter
from specdec.speculation.goodput import Acceptance, GoodputControl
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams


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
        Segment(list(range(20, 26)), list(range(6)), model.new_cache(), logits_rows=[2, 5]),
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
@pytest.mark.parametrize("chunk", [None, 4])
def test_a_batched_pass_gives_each_sequence_its_solo_result(kind, hidden, chunk, monkeypatch):
    if chunk:  # prompts run in chunks over several waves (on the native kernels)
        monkeypatch.setattr(transformer, "PREFILL_CHUNK", chunk)
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


class RandomCaps:
    """Stands in for goodput control: each request's cap drawn at random each step (no
    cap, nothing drafted, or a few nodes), so that every drafter meets cut trees and
    skipped steps."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def allocate(self, rates, other_rows=0, draft_ms=None):
        return [self.rng.choice([None, 0, 1, 2, 3]) for _ in rates]


def _requests(seed: int):
    rng, model, tok, _, _, _, _ = greedy_case(seed)
    cases = []
    for _ in range(4):
        prompt = [rng.randrange(47) for _ in range(rng.randint(1, 20))]
        cases.append((prompt, rng.randint(1, 30)))
    return rng, model, tok, cases


def _batched(
    model, tok, cases, drafters, control, sampling=SamplingParams(), late=1, prefill_rows=5
):
    """Run ``cases`` through one BatchEngine (the last ``late`` of them join after two
    steps; prompts run in parts of at most ``prefill_rows`` a step); each request's
    `Generation`."""
    engine = BatchEngine(model, max_batch=3, control=control, prefill_rows=prefill_rows)
    results, requests = [], []
    for (prompt, n), drafter in zip(cases, drafters, strict=True):
        res = Generation()
        d = Decoding(
            NativeTarget(model, capacity=8),
            tok,
            prompt,
            max_new_tokens=n,
            sampling=sampling,
            drafter=drafter,
            result=res,
        )
        results.append(res)
        requests.append(BatchRequest(d))
    for r in requests[: len(requests) - late]:
        engine.submit(r)
    steps = 0
    while engine.running or engine.waiting or steps < 2:
        engine.step()
        steps += 1
        if steps == 2:
            for r in requests[len(requests) - late :]:
                engine.submit(r)
        assert steps < 1000
    for r in requests:
        assert r.error is None, r.error
        assert r.ended.is_set()
    return results


@pytest.mark.parametrize("method", sorted(FACTORIES))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shared", [False, True])
def test_batched_requests_are_greedy_exact_under_cut_and_skipped_drafts(method, seed, shared):
    rng, model, tok, cases = _requests(seed)
    refs = [run(model, NoDrafter(), prompt, n, tok) for prompt, n in cases]
    if shared:  # as the server's: one method's options, one memory learnt into by all
        options = rng.randrange(10**6)
        drafters = [make_drafter(method, model, tok, random.Random(options)) for _ in cases]
        for d in drafters[1:]:
            d.share_memory(drafters[0])
    else:
        drafters = [make_drafter(method, model, tok, rng) for _ in cases]
    got = _batched(model, tok, cases, drafters, RandomCaps(seed))
    for g, ref in zip(got, refs, strict=True):
        assert g.token_ids == ref.token_ids
        assert g.text == ref.text
        assert g.finish_reason == ref.finish_reason


class _Prefer:
    """Stands in for auto's bandit: the arm ``label`` whenever it has a tree, else none."""

    def __init__(self, label: str) -> None:
        self.label = label

    def choose(self, available: dict[str, str], setup: dict | None = None) -> str:
        return self.label if self.label in available else "ar"

    def update(self, arm: str, situation: str, tokens: int, seconds: float) -> None:
        pass


def _learning_drafters(method: str, model, tok):
    """Three drafters of ``method`` with its default options (auto: over the n-gram cache
    and Token Recycling, choosing Token Recycling whenever it has a tree)."""
    ctx = context(model, tok)
    if method != "auto":
        return [get_method(method).build(ctx, {}) for _ in range(3)]
    drafters = [
        get_method("auto").build(ctx, {"drafters": "ngram-cache,recycle"}) for _ in range(3)
    ]
    for d in drafters:
        d.bandits = {mode: _Prefer("recycle") for mode in d.bandits}
    return drafters


@pytest.mark.parametrize("method", ["recycle", "ngram-cache", "stand", "auto"])
def test_drafters_sharing_memory_draft_from_what_either_learnt(method):
    rng, model, tok, _ = _requests(4)
    prompt = [rng.randrange(47) for _ in range(12)]
    learnt, shared, fresh = _learning_drafters(method, model, tok)
    shared.share_memory(learnt)
    first = run(model, learnt, prompt, 30, tok)
    on_its_own = copy.deepcopy(learnt)  # what the first learnt, in a memory of its own
    again = run(model, shared, prompt, 30, tok)
    want = run(model, on_its_own, prompt, 30, tok)
    cold = run(model, fresh, prompt, 30, tok)
    assert again.token_ids == want.token_ids == cold.token_ids == first.token_ids

    def drafting(g):
        return g.stats.drafted, g.stats.accepted, g.stats.pass_sizes

    # the drafter sharing the first's memory drafts from all the first learnt
    assert drafting(again) == drafting(want)
    assert drafting(again) != drafting(cold)


def _auto_over_a_draft_model(model, tok):
    """auto over a draft model (a copy of the target) and Token Recycling, choosing the
    draft model whenever it may."""
    draft = NativeTarget(perturbed_copy(model, 0.0, seed=1), capacity=4)
    ctx = context(model, tok, draft=draft)
    auto = get_method("auto").build(ctx, {"drafters": "recycle,draft", "draft_model": "the-draft"})
    label = next(k for k in auto.arms if k.startswith("draft"))
    auto.bandits = {mode: _Prefer(label) for mode in auto.bandits}
    return auto, label


def test_auto_in_a_batch_times_its_steps_as_alone_and_starts_no_draft_model():
    rng, model, tok, cases = _requests(4)
    cases = [(p, 12) for p, _ in cases[:2]]
    alone, label = _auto_over_a_draft_model(model, tok)
    run(model, alone, cases[0][0], 12, tok)
    assert alone.usage[label].steps > 0  # alone, it reads the prompt and drafts

    # a pass priced at 1000 s a row: on each request's clock a step takes about that
    drafters = [_auto_over_a_draft_model(model, tok)[0] for _ in cases]
    engine = BatchEngine(model, max_batch=4, pass_ms=lambda n: 1e6 * n)
    reqs = []
    for (prompt, n), drafter in zip(cases, drafters, strict=True):
        d = Decoding(
            NativeTarget(model, capacity=8), tok, prompt, max_new_tokens=n, drafter=drafter
        )
        reqs.append(engine.submit(BatchRequest(d)))
    engine.step()  # the prompts
    engine.step()  # a step together
    for d in drafters:  # together: the draft model would stall both to read its prompt
        assert label not in d.usage
        use = d.usage["ar"]
        assert use.steps == 1 and 999 < use.seconds < 1001
    while engine.running:
        engine.step()
    assert all(r.error is None for r in reqs)


@pytest.mark.parametrize("method", ["ar", "draft", "pld"])
def test_a_seeded_sample_is_the_same_in_a_batch_as_alone(method):
    rng, model, tok, cases = _requests(7)
    sampling = SamplingParams(temperature=1.0, seed=11)
    solo = [
        run(model, make_drafter(method, model, tok, random.Random(i)), p, n, tok, sampling)
        for i, (p, n) in enumerate(cases)
    ]
    drafters = [make_drafter(method, model, tok, random.Random(i)) for i in range(len(cases))]
    got = _batched(model, tok, cases, drafters, None, sampling)
    assert [g.token_ids for g in got] == [s.token_ids for s in solo]


class _Listener(NoDrafter):
    """Asks for prompt rows and hidden states, and keeps what it is given."""

    feature_layers = (0, 1)

    def prompt_rows(self, prompt_ids):
        return [0, 2, 5, 6]

    def observe_prompt(self, prompt_ids, rows, logits):
        self.rows, self.logits = rows, logits

    def observe_features(self, hidden):
        self.hidden = getattr(self, "hidden", None)
        if self.hidden is None:
            self.hidden = hidden


@pytest.mark.parametrize("kind", ["float64", "native-int8"])
@pytest.mark.parametrize("part", [1, 2, 3, 7, None])
def test_a_prompt_in_parts_gives_what_it_gives_whole(kind, part):
    model = (
        random_transformer("qwen2", seed=3)
        if kind == "float64"
        else quantised_model(5, "int8", torch.float32)
    )
    tok = CharTokenizer(vocab=model.config.vocab_size)
    prompt = [3, 9, 4, 1, 7, 7, 2, 8, 5]
    got = []
    for max_rows in (None, part):
        listener = _Listener()
        target = NativeTarget(model, capacity=4)
        d = Decoding(target, tok, prompt, max_new_tokens=4, drafter=listener)
        parts = 0
        while not d.started:
            parts += 1
            d.start(*run_pass(target, d.prefill(max_rows)))
        assert parts == (1 if max_rows is None else -(-len(prompt) // max_rows))
        while not d.done:
            d.verified(*run_pass(target, d.propose()))
        got.append((d.out.token_ids, listener.rows, listener.logits, listener.hidden))
    (ids, rows, logits, hidden), (ids2, rows2, logits2, hidden2) = got
    assert ids == ids2 and rows == rows2 == [0, 2, 5, 6, 8]
    assert logits.shape[0] == 5 and hidden.shape[0] == len(prompt)
    # the native kernels are per row: bit for bit; float64 within rounding
    tol = 0 if kind != "float64" else 1e-12
    torch.testing.assert_close(logits2, logits, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden2, hidden, rtol=tol, atol=tol)


def test_a_long_prompt_joins_in_parts_while_others_decode():
    rng, model, tok, _ = _requests(2)
    engine = BatchEngine(model, max_batch=4, prefill_rows=4)
    short = Decoding(NativeTarget(model, capacity=8), tok, [1, 2, 3], max_new_tokens=30)
    engine.submit(BatchRequest(short))
    engine.step()
    engine.step()
    made = len(short.out.token_ids)
    prompt = [rng.randrange(47) for _ in range(14)]
    long = engine.submit(
        BatchRequest(Decoding(NativeTarget(model, capacity=8), tok, prompt, max_new_tokens=5))
    )
    for _ in range(4):  # 14 prompt tokens, 4 a step: the short one decodes beside them
        assert not long.decoding.started
        engine.step()
        assert engine.last_rows == 1 + min(4, 14 - 4 * _)
    assert long.decoding.started and long.first_token_s is not None
    assert len(short.out.token_ids) == made + 4
    while engine.running:
        engine.step()
    assert long.decoding.out.token_ids == run(model, NoDrafter(), prompt, 5, tok).token_ids


def test_calls_run_on_the_engines_thread():
    import threading
    import time

    engine = BatchEngine(None)
    here = threading.get_ident()
    assert engine.call(threading.get_ident) == here  # no thread runs it: inline
    runner = threading.Thread(target=engine.run)
    runner.start()
    try:
        while engine._thread is None:
            time.sleep(0.001)
        assert engine.call(threading.get_ident) == runner.ident
        with pytest.raises(ZeroDivisionError):  # its exception, raised to the caller
            engine.call(lambda: 1 / 0)
    finally:
        engine.stop()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert engine.call(threading.get_ident) == here


def test_goodput_control_drafts_less_as_the_batch_grows():
    # a pass-cost curve like the 1.5B's: 16 rows cost ~4.5 one-row passes
    control = GoodputControl(lambda n: 30.0 + 6.6 * (n - 1))
    assert control.allocate([0.8]) == [None]  # alone: the drafter sizes its own tree
    two = control.allocate([0.8, 0.8])
    many = control.allocate([0.8] * 16)
    assert sum(two) > 0
    assert sum(many) < sum(two) * 8
    assert control.allocate([0.1] * 16) == [0] * 16  # poor acceptance under load: none
    flat = GoodputControl(lambda n: 30.0)  # rows free: draft the most allowed
    assert flat.allocate([0.5, 0.5]) == [16, 16]


def test_acceptance_estimate_follows_the_request():
    a = Acceptance()
    for _ in range(30):
        a.observe(4, 4)
    assert a.rate > 0.9
    for _ in range(30):
        a.observe(4, 0)
    assert a.rate < 0.2


def test_a_cancelled_request_leaves_the_batch_and_others_finish():
    rng, model, tok, cases = _requests(3)
    refs = [run(model, NoDrafter(), prompt, n, tok) for prompt, n in cases]
    engine = BatchEngine(model, max_batch=4)
    reqs = []
    for prompt, _ in cases:
        d = Decoding(NativeTarget(model, capacity=8), tok, prompt, max_new_tokens=40)
        reqs.append(engine.submit(BatchRequest(d)))
    engine.step()
    reqs[0].cancel()
    engine.step()
    assert reqs[0].ended.is_set() and reqs[0] not in engine.running
    while engine.running:
        engine.step()
    for r, ref in zip(reqs[1:], refs[1:], strict=True):
        n = len(ref.token_ids)
        assert r.decoding.out.token_ids[:n] == ref.token_ids[: len(r.decoding.out.token_ids)]


def _service(budget_slots: int, max_queue: int = 8):
    from specdec.api import Generator
    from specdec.serve.service import Service

    model = random_transformer("llama", seed=2, vocab=48)
    gen = Generator(NativeTarget(model), CharTokenizer(vocab=48), "tiny")
    svc = Service(
        gen, method="ar", max_batch=4, max_queue=max_queue, goodput=False, background=False
    )
    svc.memory_budget = budget_slots * svc.kv_bytes_per_token
    return svc


def test_memory_budget_shrinks_trees_then_queues_then_refuses():
    from specdec.serve.service import MIN_TREE_ROOM, TREE_ROOM, Job, OverloadedError, TooLargeError

    prompt, new = [1, 2, 3, 4], 20
    base = len(prompt) + new
    svc = _service(2 * base + TREE_ROOM + MIN_TREE_ROOM + 2, max_queue=2)
    with pytest.raises(TooLargeError):  # could never fit
        svc.submit(Job(prompt, 10 * svc.memory_budget), None, lambda r: None)
    ended = []
    reqs = [svc.submit(Job(prompt, new), None, ended.append) for _ in range(2)]
    with pytest.raises(OverloadedError):  # two waiting: the queue is full
        svc.submit(Job(prompt, new), None, ended.append)
    svc.engine.step()
    third = svc.submit(Job(prompt, new), None, ended.append)
    svc.engine.step()
    assert reqs[0].max_nodes == TREE_ROOM - 1  # the full room for its trees
    assert MIN_TREE_ROOM - 1 <= reqs[1].max_nodes < TREE_ROOM - 1  # less room: smaller trees
    assert third in svc.engine.waiting  # no room left: it waits
    assert svc.reserved <= svc.memory_budget
    while svc.engine.running or svc.engine.waiting:
        svc.engine.step()
    assert len(ended) == 3 and all(r.error is None for r in ended)
    assert svc.reserved == 0
    texts = {r.decoding.out.text for r in ended}
    assert len(texts) == 1  # the same prompt, greedy: the same answer, in any room


def test_the_servers_requests_of_a_method_share_its_memory():
    from specdec.serve.service import Job

    svc = _service(10_000)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8], [1, 2, 3, 4, 5, 9]]
    ended = []
    reqs = [svc.submit(Job(p, 20, method="ngram-cache"), None, ended.append) for p in prompts]
    reqs.append(
        svc.submit(
            Job(prompts[0], 20, method="ngram-cache", options={"max_nodes": 3}), None, ended.append
        )
    )
    drafters = [r.decoding.drafter for r in reqs]
    assert len({id(d) for d in drafters}) == 4  # one each while they run together
    same = drafters[:3]  # one method and options: one memory
    assert all(d.next is same[0].next for d in same)
    assert drafters[3].next is not same[0].next  # other options: a memory of their own
    while svc.engine.running or svc.engine.waiting:
        svc.engine.step()
    assert all(r.error is None for r in ended)
    alone = _service(10_000)
    for r, p in zip(reqs, prompts + prompts[:1], strict=True):
        solo = alone.submit(Job(p, 20, method="ar"), None, lambda r: None)
        while alone.engine.running or alone.engine.waiting:
            alone.engine.step()
        assert r.decoding.out.token_ids == solo.decoding.out.token_ids
    # a later request's drafter (from the pool or new) drafts from what they learnt
    later = svc.submit(Job(prompts[0], 20, method="ngram-cache"), None, lambda r: None)
    assert later.decoding.drafter.next is same[0].next


@pytest.mark.parametrize("kind", ["float64", "native-int8"])
def test_a_lone_prompt_in_chunks_equals_one_pass(kind, monkeypatch):
    monkeypatch.setattr(transformer, "PREFILL_CHUNK", 4)
    model = (
        random_transformer("qwen2", seed=3)
        if kind == "float64"
        else quantised_model(5, "int8", torch.float32)
    )
    tokens = list(range(1, 12))
    want = model(torch.tensor(tokens), torch.arange(11), model.new_cache())
    (got,) = model.forward_batch([Segment(tokens, list(range(11)), model.new_cache())])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_goodput_control_does_not_draft_on_a_prompts_back():
    # the 1.5B's curve: memory-bound up to a few rows, then ~7 ms a row
    control = GoodputControl(PassCost({1: 33, 4: 40, 8: 58, 16: 115, 48: 330}))
    rates = [0.6] * 4
    assert sum(control.allocate(rates)) > 0  # four decoding: drafting is nearly free
    # beside a prompt part of 128 rows each drafted row costs its full 7 ms: none pays
    assert control.allocate(rates, other_rows=128) == [0] * 4
    assert sum(control.allocate([0.99] * 4, other_rows=128)) > 0  # a sure draft still does


def test_goodput_control_pays_for_drafting_time():
    control = GoodputControl(lambda n: 30.0 + 6.6 * (n - 1))
    cheap = control.allocate([0.7, 0.7, 0.7, 0.7], 0, [0.1] * 4)
    costly = control.allocate([0.7, 0.7, 0.7, 0.7], 0, [0.1, 0.1, 0.1, 500.0])
    assert cheap[3] > 0 and costly[3] == 0  # a drafter slower than what it earns is not asked
    assert costly[:3] == cheap[:3]
