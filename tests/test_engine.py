"""The decode loop: greedy equals a hand-written argmax loop; stop conditions; seeded sampling."""

import pytest
import torch
from random_models import CharTokenizer, full_logits, random_transformer

from specdec.engine import Engine, Generation
from specdec.errors import InvalidRequestError
from specdec.models.target import NativeTarget
from specdec.speculation.sampling import SamplingParams


def reference_greedy(model, prompt, n, eos):
    seq = list(prompt)
    out = []
    for _ in range(n):
        t = int(full_logits(model, seq)[-1].argmax())
        out.append(t)
        seq.append(t)
        if t in eos:
            break
    return out


def run(engine, prompt, **kw):
    res = Generation()
    text = "".join(engine.stream(prompt, result=res, **kw))
    assert text == res.text
    return res


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_matches_reference(arch, seed):
    model = random_transformer(arch, seed=seed)
    tok = CharTokenizer()
    engine = Engine(NativeTarget(model, capacity=8), tok)
    prompt = torch.randint(0, 63, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    res = run(engine, prompt, max_new_tokens=30)
    assert res.token_ids == reference_greedy(model, prompt, 30, tok.eos_token_ids)
    assert res.stats.new_tokens == len(res.token_ids)
    assert res.stats.target_passes == res.stats.new_tokens  # tau 1 for AR
    assert res.finish_reason in ("stop", "length")
    # the engine is reusable: a second call gives the same
    assert run(engine, prompt, max_new_tokens=30).token_ids == res.token_ids


def test_eos_stops_and_is_kept_in_ids():
    model = random_transformer("qwen2", seed=1)
    prompt = [1, 2, 3]
    first = reference_greedy(model, prompt, 5, set())
    tok = CharTokenizer()
    tok.eos_token_ids = frozenset({first[2]})  # make the third greedy token the EOS
    res = run(Engine(NativeTarget(model), tok), prompt, max_new_tokens=50)
    assert res.token_ids == first[:3]
    assert res.finish_reason == "stop"


def test_stop_string_cuts_text():
    model = random_transformer("qwen2", seed=2)
    tok = CharTokenizer(vocab=1000)  # no EOS among the model's 64 tokens
    engine = Engine(NativeTarget(model), tok)
    full = run(engine, [4, 5, 6], max_new_tokens=20)
    assert len(full.text) == 20
    for stop in (full.text[5:7], full.text[5:7] + "~", full.text[12]):
        # two tokens long: its first character is held back, never streamed; a string that
        # starts like the text but goes on differently holds the text back only for a while
        res = run(engine, [4, 5, 6], max_new_tokens=20, stop=(stop,))
        if stop in full.text:
            assert res.finish_reason == "stop"
            assert res.text == full.text[: full.text.find(stop)]
        else:
            assert res.finish_reason == "length" and res.text == full.text


def test_max_new_tokens_and_bad_input():
    model = random_transformer("qwen2")
    engine = Engine(NativeTarget(model), CharTokenizer(vocab=1000))  # EOS never produced
    res = run(engine, [1, 2], max_new_tokens=5)
    assert len(res.token_ids) == 5 and res.finish_reason == "length"
    with pytest.raises(InvalidRequestError):
        run(engine, [], max_new_tokens=5)
    with pytest.raises(InvalidRequestError):
        run(engine, [1] * 600, max_new_tokens=5)  # context is 512
    res = run(engine, [1] * 508, max_new_tokens=50)  # clipped to the context
    assert len(res.token_ids) == 4 and res.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_varies():
    model = random_transformer("llama", seed=4)
    engine = Engine(NativeTarget(model), CharTokenizer(vocab=1000))
    params = SamplingParams(temperature=1.0, seed=7)
    a = run(engine, [1, 2, 3], max_new_tokens=12, sampling=params).token_ids
    b = run(engine, [1, 2, 3], max_new_tokens=12, sampling=params).token_ids
    c = run(
        engine, [1, 2, 3], max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=8)
    ).token_ids
    assert a == b and a != c
