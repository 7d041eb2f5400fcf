"""Cross-vocabulary drafting: a draft model with another tokenizer, translated through text.

- the translation of draft text into target tokens at tricky boundaries (a committed
  token that is the start of a longer one, non-canonical committed splits, UTF-8
  characters split over byte tokens, a tokenizer that does not round-trip);
- greedy output equals autoregressive decoding on random float64 models whose
  draft tokenizer really differs (chunks of characters, other ids);
- a draft that is the target in another vocabulary has every draft accepted;
- sampling through the engine has the target's exact distribution (chi-square);
- the method through the registry, the API and the CLI on tiny real-format models;
- SmolLM2-135M drafting for Qwen2.5-Coder-0.5B (marked ``real_model``).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from exactness_stats import chi2_pvalue, min_detectable_tv
from random_models import (
    CharTokenizer,
    ChunkTokenizer,
    chunk_vocabulary,
    perturbed_copy,
    random_transformer,
    remap_vocab,
)
from test_sampling_exactness import V, exact_distribution, sample_counts

from specdec.engine import Engine, Generation
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.base import DraftState, NoDrafter
from specdec.speculation.drafters.cross_vocab import CommittedText, CrossVocabDrafter, translate
from specdec.speculation.sampling import SamplingParams

CODE = ["f", "i", "b", "fi", "fib", "(", "n", ")", "(n", " ", " fi", " fib", ":", "\n"]


def ids_of(tok: ChunkTokenizer, *pieces: str) -> list[int]:
    return [tok.index[p.encode()] for p in pieces]


# -- translation ----------------------------------------------------------------------
def test_translation_continues_after_the_committed_tokens():
    tok = ChunkTokenizer(CODE)
    committed = ids_of(tok, " fib")
    tails = [(committed, " fib")]
    assert translate(tok, "(n):", tails, committed) == ids_of(tok, "(n", ")", ":")


def test_translation_when_the_boundary_merges_into_a_longer_token():
    """Committed " fi", draft "b(n)": " fib" would swallow the boundary; the draft text is
    encoded on its own after the committed token."""
    tok = ChunkTokenizer(CODE)
    committed = ids_of(tok, " fi")
    assert tok.encode(" fib(n)") == ids_of(tok, " fib", "(n", ")")
    got = translate(tok, "b(n)", [(committed, " fi")], committed)
    assert got == ids_of(tok, "b", "(n", ")")
    assert tok.decode(committed + got) == " fib(n)"


def test_translation_after_a_non_canonical_split_uses_a_shorter_tail():
    tok = ChunkTokenizer(CODE)
    committed = ids_of(tok, "f", "i", "b")  # the target generated "fib" letter by letter
    c = CommittedText(tok)
    c.push(committed)
    assert c.tail(4) == (committed, "fib")
    assert c.tail(1) == (ids_of(tok, "b"), "b")
    got = translate(tok, "(n)", [c.tail(4), c.tail(1)], c.tail(1)[0])
    assert got == ids_of(tok, "(n", ")")


def test_translation_into_byte_tokens_of_one_character():
    tok = ChunkTokenizer(["a", b"\xc3", b"\xa9", " "])  # "é" is two byte tokens
    committed = ids_of(tok, "a")
    got = translate(tok, "é a", [(committed, "a")], committed)
    assert got == [1, 2, 3, 0]
    assert tok.decode(committed + got) == "aé a"


def test_translation_refuses_what_does_not_round_trip():
    class SpacePrefix(ChunkTokenizer):
        """Encodes every string with a leading space, like SentencePiece's dummy prefix."""

        def encode(self, text, add_special_tokens=True):
            return super().encode(" " + text)

    tok = SpacePrefix(CODE)
    committed = ChunkTokenizer.encode(tok, " fi")
    assert translate(tok, "b(n)", [(committed, " fi")], committed) == []
    assert translate(tok, "", [(committed, " fi")], committed) == []


def test_committed_text_waits_for_a_whole_character():
    tok = ChunkTokenizer(["a", b"\xc3", b"\xa9", b"\xf0\x9f", b"\xa4\x96"])
    c = CommittedText(tok)
    c.push([0, 1])  # "a" and the first byte of "é"
    assert (c.text, c.pending) == ("a", 1)
    c.push([2, 3])
    assert (c.text, c.pending) == ("aé", 1)
    c.push([4])
    assert (c.text, c.pending) == ("aé🤖", 0)
    assert c.tail(2) == ([3, 4], "🤖")
    c.push([1] * 5)  # never completes: given up on after four bytes, as U+FFFD
    assert c.pending == 1 and c.text.startswith("aé🤖\ufffd")


def test_committed_text_from_a_bulk_prompt_then_tokens():
    tok = ChunkTokenizer(CODE)
    ids = tok.encode("fib(n):\n fib(n)")
    c = CommittedText(tok)
    c.push(ids[:4], bulk=True)
    c.push(ids[4:])
    assert c.text == "fib(n):\n fib(n)"
    assert c.tail(2) == (ids[-2:], "(n)")


def letters_draft(model, noise: float = 0.0, seed: int = 0):
    """The target (or a perturbed copy) in a draft vocabulary of the same letters, other ids."""
    v = model.config.vocab_size
    order = list(range(v))
    random.Random(seed).shuffle(order)
    dtok = ChunkTokenizer([chr(65 + i) for i in order])
    return remap_vocab(perturbed_copy(model, noise, seed=seed), order), dtok


def test_draft_text_is_cut_before_an_incomplete_character():
    model = random_transformer("llama", seed=1, vocab=6)
    dtok = ChunkTokenizer(["a", "b", b"\xc3", b"\xa9", "\u00e9"])
    drafter = CrossVocabDrafter(NativeTarget(model), dtok, CharTokenizer(64))
    assert drafter._draft_text([0], [1, 2]) == "b"
    assert drafter._draft_text([0], [2, 3, 1, 2]) == "éb"


def test_nothing_is_drafted_after_half_a_character():
    model = random_transformer("llama", seed=1, vocab=6)
    ttok = ChunkTokenizer(["a", "b", b"\xc3", b"\xa9", "\u00e9", *"cdef"])
    dtok = ChunkTokenizer(["ab", "é", *"abcd"])
    drafter = CrossVocabDrafter(NativeTarget(model), dtok, ttok)
    tokens = [0, 1, 2]  # "ab" and the first byte of "é"
    drafter.reset(tokens)
    state = DraftState(tokens, 2, SamplingParams(), None, budget=8)
    assert len(drafter.propose(state)) == 0
    state = DraftState(tokens + [3], 2, SamplingParams(), None, budget=8)
    assert len(drafter.propose(state)) > 0


# -- greedy exactness -----------------------------------------------------------------
def run(model, drafter, prompt, n, tok, sampling=SamplingParams()):
    res = Generation()
    engine = Engine(NativeTarget(model, capacity=8), tok)
    text = "".join(
        engine.stream(prompt, max_new_tokens=n, sampling=sampling, drafter=drafter, result=res)
    )
    assert text == res.text
    return res


@pytest.mark.parametrize("seed", range(10))
def test_greedy_equals_autoregressive_with_a_chunked_draft_vocabulary(seed):
    """The target has one token per letter or a chunk vocabulary of its own; the draft a
    different chunk vocabulary, and is either random or the target plus random chunk tokens."""
    rng = random.Random(seed)
    letters = "".join(chr(65 + i) for i in range(24))
    if seed % 2:
        ttok = ChunkTokenizer(chunk_vocabulary(letters, 16, seed=seed), eos=[3])
        vocab = ttok.vocab_size
    else:
        ttok, vocab = CharTokenizer(vocab=24), 24
    model = random_transformer(rng.choice(["qwen2", "llama"]), seed=seed, vocab=vocab)
    dtok = ChunkTokenizer(chunk_vocabulary(letters, rng.choice([0, 8, 30]), seed=seed + 50))
    if rng.random() < 0.5:
        draft = random_transformer("llama", seed=seed + 7, vocab=dtok.vocab_size, layers=1)
    else:  # the letters of the draft vocabulary are the target's letters (when it has them)
        old = [ttok.encode(p.decode())[0] if len(p) == 1 else None for p in dtok.pieces]
        draft = remap_vocab(perturbed_copy(model, 0.02, seed=seed), old, seed=seed)
    prompt = [rng.randrange(vocab - 1) for _ in range(rng.randint(1, 12))]
    n = rng.randint(5, 40)
    ref = run(model, NoDrafter(), prompt, n, ttok)
    drafter = CrossVocabDrafter(
        NativeTarget(draft, capacity=4),
        dtok,
        ttok,
        num_draft_tokens=rng.randint(1, 6),
        target_vocab_size=vocab,
    )
    got = run(model, drafter, prompt, n, ttok)
    assert got.token_ids == ref.token_ids
    assert got.finish_reason == ref.finish_reason
    assert got.stats.target_passes <= ref.stats.target_passes


def test_the_target_in_another_vocabulary_is_accepted_in_full():
    model = random_transformer("qwen2", seed=5, vocab=48)
    draft, dtok = letters_draft(model)
    tok = CharTokenizer(vocab=1000)  # no EOS among the model's tokens
    drafter = CrossVocabDrafter(NativeTarget(draft), dtok, tok, num_draft_tokens=4)
    res = run(model, drafter, [1, 2, 3], 21, tok)
    assert res.token_ids == run(model, NoDrafter(), [1, 2, 3], 21, tok).token_ids
    # prefill gives 1 token, then each pass commits 4 drafted + 1 bonus
    assert res.stats.target_passes == 1 + 4
    assert res.stats.accepted == res.stats.drafted == 16


def test_chunk_drafts_become_several_target_tokens():
    """A draft vocabulary of letter pairs only: each draft token is two target tokens."""
    model = random_transformer("qwen2", seed=5, vocab=8)
    tok = CharTokenizer(vocab=1000)
    letters = [chr(65 + i) for i in range(8)]
    dtok = ChunkTokenizer(letters + [a + b for a in letters for b in letters])
    draft = random_transformer("llama", seed=3, vocab=dtok.vocab_size, layers=1)
    drafter = CrossVocabDrafter(NativeTarget(draft), dtok, tok, num_draft_tokens=3)
    res = run(model, drafter, [1, 2, 3], 30, tok)
    assert res.token_ids == run(model, NoDrafter(), [1, 2, 3], 30, tok).token_ids
    assert res.stats.drafted > 3 * (res.stats.target_passes - 1)


def test_adaptive_length_through_the_registry():
    from specdec.speculation.draft_length import AdaptiveLength
    from specdec.speculation.drafters.base import BuildContext
    from specdec.speculation.methods import get_method

    model = random_transformer("qwen2", seed=5, vocab=48)
    draft, dtok = letters_draft(model)
    tok = CharTokenizer(vocab=1000)
    ctx = BuildContext(
        tokenizer=tok,
        vocab_size=48,
        load_draft=lambda spec, same_tokenizer: (NativeTarget(draft), dtok),
    )
    method = get_method("cross-vocab")
    drafter = method.build(ctx, {"draft_model": "x", "adaptive": "yes"})
    assert isinstance(drafter.policy, AdaptiveLength)
    res = run(model, drafter, [1, 2, 3], 40, tok)
    assert res.stats.target_passes < 40 / 4  # lengthened past 4 after full acceptances
    with pytest.raises(Exception, match="needs a draft model"):
        method.build(ctx, {})


# -- sampling exactness -----------------------------------------------------------------
@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SAMPLING_RUNS = 3_000
# the smallest TV (on the pooled cells) a chi-square of SAMPLING_RUNS runs at p 0.001 detects
# with probability >= 95% in any direction (exactness_stats.min_detectable_tv, rounded up)
SAMPLING_DETECTS_TV = 0.077


def test_stated_detectable_size():
    model = random_transformer("qwen2", seed=3, vocab=V, layers=2)
    exact = exact_distribution(model, SamplingParams(temperature=1.0))
    size = min_detectable_tv(exact, SAMPLING_RUNS, 0.001)
    assert SAMPLING_DETECTS_TV - 0.002 < size <= SAMPLING_DETECTS_TV


@pytest.mark.parametrize("case", ["same-letters", "chunks"])
def test_engine_sampling_matches_target_distribution(case, one_thread):
    """SAMPLING_RUNS seeded runs of 3 tokens (one drafted level), chi-square p > 0.001;
    detects TV SAMPLING_DETECTS_TV. tests/test_sampling_at_depth.py runs cross-vocab at
    depth."""
    model = random_transformer("qwen2", seed=3, vocab=V, layers=2)
    params = SamplingParams(temperature=1.0, seed=0)
    exact = exact_distribution(model, params)
    ttok = CharTokenizer(vocab=1000)
    if case == "same-letters":  # a close draft: drafts often accepted
        draft, dtok = letters_draft(model, noise=0.3, seed=1)
    else:  # chunks, unrelated: each draft token may be several target tokens
        dtok = ChunkTokenizer(chunk_vocabulary("ABCDEF", 12, seed=4))
        draft = random_transformer("llama", seed=9, vocab=dtok.vocab_size, layers=1)

    def make():
        return CrossVocabDrafter(NativeTarget(draft, capacity=16), dtok, ttok, 2)

    counts = sample_counts(model, make, params, runs=SAMPLING_RUNS)
    pvalue = chi2_pvalue(counts, exact)
    assert pvalue > 0.001, f"{case}: chi-square p = {pvalue:.2e}"


# -- through the API and the command line, on tiny models in real formats ------------------
def test_cli_cross_vocab_on_tiny_models(tmp_path, monkeypatch, capsys):
    from fixtures import save_hf_folder, tiny_hf_model

    from specdec.cli import main

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    target = save_hf_folder(tiny_hf_model("qwen2", seed=0), tmp_path / "target")
    other = save_hf_folder(tiny_hf_model("llama", seed=1), tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    keys = list(vocab)[10:40]
    values = [vocab[k] for k in keys]
    for k, v in zip(keys, values[1:] + values[:1], strict=True):
        vocab[k] = v  # another token -> id map
    (other / "tokenizer.json").write_text(json.dumps(spec))
    capsys.readouterr()
    common = ["generate", "hello", "--quiet", "--json", "--dtype", "float32"]
    common += ["--max-new-tokens", "12", "--model", str(target), "--draft", str(other)]
    assert main(common + ["--method", "draft"]) != 0
    assert "--method cross-vocab" in capsys.readouterr().err
    assert main(common + ["--method", "cross-vocab", "--compare"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "cross-vocab" and report["identical"] is True
    assert report["stats"]["drafted"] > 0


# -- a real pair ------------------------------------------------------------------------
@pytest.mark.real_model
def test_smollm2_drafts_for_qwen_coder():
    # pulls the models into the specdec cache when missing, as tests/test_real_models.py does
    import specdec

    gen = specdec.load("qwen2.5-coder-0.5b", dtype="float32", progress=False)
    prompt, n = "def fib(n):", 32
    ref = gen.generate(prompt, max_new_tokens=n, method="ar")
    got = gen.generate(prompt, max_new_tokens=n, method="cross-vocab", draft_model="smollm2-135m")
    print(json.dumps(got.stats.to_dict()))
    assert got.token_ids == ref.token_ids
    assert got.stats.accepted > 0
    assert got.stats.target_passes < ref.stats.target_passes
