"""The conformance suite: every registered method through the same exactness checks.

Greedy: on small random float64 models, a method's output equals plain
autoregressive decoding token for token (random prompts, lengths, draft sizes,
EOS inside drafts). A method cannot be registered without an entry here.
"""

import random

import pytest
import torch
from random_models import CharTokenizer, perturbed_copy, random_transformer

from specdec.engine import Engine, Generation
from specdec.errors import InvalidRequestError
from specdec.models.pass_cost import PassCost
from specdec.models.target import NativeTarget, VocabSubset
from specdec.speculation.drafters.base import NoDrafter
from specdec.speculation.drafters.draft_model import DraftModelDrafter
from specdec.speculation.drafters.lookahead import LookaheadDrafter
from specdec.speculation.drafters.merged import MergedDrafter
from specdec.speculation.drafters.ngram_cache import NgramCacheDrafter
from specdec.speculation.drafters.prompt_lookup import PromptLookupDrafter
from specdec.speculation.drafters.stand import StandDrafter
from specdec.speculation.drafters.token_recycling import TokenRecyclingDrafter
from specdec.speculation.draft_length import AdaptiveLength, FixedLength
from specdec.speculation.sizing import TreeBudget
from specdec.speculation.methods import METHODS
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.verifiers.spectr import SpecTrVerifier


def make_draft(target_model, rng: random.Random, shape: str | None = None):
    noise = rng.choice([0.0, 0.02, 0.1, 1.0])  # identical, close, loose, unrelated
    draft = perturbed_copy(target_model, noise, seed=rng.randrange(1000))
    shape = shape or rng.choice(["chain", "chain", "static", "dynamic"])
    extra = {}
    if shape == "static":
        extra["branching"] = [rng.randint(1, 3) for _ in range(rng.randint(1, 4))]
        # how siblings are drawn (i.i.d., without replacement: RSD-C, beam search: RSD-S) and
        # SpecTr; greedy output must not depend on any of them
        extra["sibling_sampling"], extra["verify"] = rng.choice(
            [
                ("iid", "specinfer"),
                ("iid", "spectr"),
                ("without_replacement", "specinfer"),
                ("beam", "specinfer"),
            ]
        )
    elif shape == "dynamic":
        # a flat or a steep verification cost: tiny trees, or wide ones
        slope = rng.choice([0.0, 0.05, 1.0])
        extra["tree_budget"] = TreeBudget(
            PassCost({1: 1.0, 64: 1.0 + 63 * slope}),
            PassCost({1: rng.choice([0.05, 0.3])}),
            max_nodes=rng.randint(1, 24),
        )
        extra["width"], extra["max_depth"] = rng.randint(1, 4), rng.randint(1, 6)
    draft_target = NativeTarget(draft, capacity=4)
    if rng.random() < 0.3:  # draft_vocab: logits over a subset of the vocabulary only
        vocab = target_model.config.vocab_size
        draft_target = VocabSubset(draft_target, torch.tensor(rng.sample(range(vocab), vocab // 3)))
    return DraftModelDrafter(
        draft_target,
        target_model.config.vocab_size,
        num_draft_tokens=rng.randint(1, 6),
        **extra,
    )


def make_cross_vocab(target_model, rng: random.Random):
    """A draft with another tokenizer (letters and chunks of them, other ids): unrelated,
    or the target (perturbed) in the draft's ids with random chunk tokens beside."""
    from random_models import ChunkTokenizer, chunk_vocabulary, remap_vocab

    from specdec.speculation.drafters.cross_vocab import CrossVocabDrafter

    vocab = target_model.config.vocab_size
    ttok = CharTokenizer(vocab)
    pieces = chunk_vocabulary(ttok.decode(range(vocab)), rng.choice([0, 8, 40]), rng.randrange(99))
    dtok = ChunkTokenizer(pieces, eos=[rng.randrange(len(pieces))] if rng.random() < 0.3 else [])
    if rng.random() < 0.5:
        draft = random_transformer("llama", seed=rng.randrange(1000), vocab=len(pieces), layers=1)
    else:
        old = [ttok.encode(p.decode())[0] if len(p) == 1 else None for p in dtok.pieces]
        noisy = perturbed_copy(target_model, rng.choice([0.0, 0.05]), seed=rng.randrange(1000))
        draft = remap_vocab(noisy, old, seed=rng.randrange(1000))
    return CrossVocabDrafter(
        NativeTarget(draft, capacity=4),
        dtok,
        ttok,
        num_draft_tokens=rng.randint(1, 6),
        target_vocab_size=vocab,
    )


def make_pld(target_model, rng: random.Random):
    lo = rng.randint(1, 3)
    return PromptLookupDrafter(
        num_draft_tokens=rng.randint(1, 8),
        min_ngram=lo,
        max_ngram=lo + rng.randint(0, 2),
        branches=rng.randint(1, 4),
        max_nodes=rng.randint(1, 20),
        pass_cost=rng.choice([None, PassCost({1: 1.0, 64: 2.0}), PassCost({1: 1.0, 64: 64.0})]),
    )


def make_recycle(target_model, rng: random.Random):
    cost = rng.choice([None, PassCost({1: 1.0, 64: 2.0}), PassCost({1: 1.0, 64: 64.0})])
    return TokenRecyclingDrafter(
        target_model.config.vocab_size,
        top_k=rng.randint(1, 8),
        max_nodes=rng.randint(1, 30),
        max_depth=rng.randint(1, 8),
        pass_cost=cost,
    )


def make_ngram_cache(target_model, rng: random.Random):
    lo = rng.randint(1, 3)
    return NgramCacheDrafter(
        num_draft_tokens=rng.randint(1, 8),
        min_ngram=lo,
        max_ngram=lo + rng.randint(0, 2),
        branches=rng.randint(1, 3),
        max_nodes=rng.randint(1, 20),
        min_count=rng.randint(1, 2),
        min_share=rng.choice([0.0, 0.3, 0.9]),
        max_entries=rng.choice([5, 10_000]),
        pass_cost=rng.choice([None, PassCost({1: 1.0, 64: 2.0}), PassCost({1: 1.0, 64: 64.0})]),
    )


def make_lookahead(target_model, rng: random.Random):
    return LookaheadDrafter(
        window=rng.randint(2, 5),
        ngram=rng.randint(3, 5),
        guesses=rng.randint(1, 5),
        pool_from_prompt=rng.random() < 0.5,
        pass_cost=rng.choice([None, PassCost({1: 1.0, 64: 2.0}), PassCost({1: 1.0, 64: 64.0})]),
    )


def make_stand(target_model, rng: random.Random):
    lo = rng.randint(1, 2)
    return StandDrafter(
        target_model.config.vocab_size,
        top_k=rng.randint(1, 10),
        min_ngram=lo,
        max_ngram=lo + rng.randint(0, 3),
        max_nodes=rng.randint(1, 30),
        max_depth=rng.randint(1, 8),
        pass_cost=rng.choice([None, PassCost({1: 1.0, 64: 2.0})]),
        max_entries=rng.choice([3, 100_000]),
    )


_STORES: dict[int, object] = {}


def make_rest(target_model, rng: random.Random):
    """A datastore of random documents over the model's vocabulary (short spans match)."""
    import tempfile

    from specdec.speculation import datastore as ds
    from specdec.speculation.drafters.retrieval import RetrievalDrafter

    vocab = target_model.config.vocab_size
    if vocab not in _STORES:
        g = random.Random(vocab)
        docs = [[g.randrange(vocab) for _ in range(g.randint(1, 60))] for _ in range(40)]
        folder = tempfile.mkdtemp(prefix="specdec-test-store-")
        ds.write(docs, folder, "test")
        _STORES[vocab] = ds.Datastore(folder)
    lo = rng.randint(1, 3)
    return RetrievalDrafter(
        _STORES[vocab],
        max_nodes=rng.randint(1, 20),
        continuation=rng.randint(1, 8),
        min_span=lo,
        max_span=lo + rng.randint(0, 4),
        max_matches=rng.choice([1, 4, 512]),
        pass_cost=rng.choice([None, PassCost({1: 1.0, 64: 2.0}), PassCost({1: 1.0, 64: 64.0})]),
    )


def make_merged(target_model, rng: random.Random):
    """Model-free trees merged with each other or with a draft model's (sampled q nodes)."""
    parts = [
        make_pld,
        make_recycle,
        make_rest,
        make_ngram_cache,
        make_lookahead,
        make_stand,
        make_draft,
    ]
    first, second = rng.sample(parts, 2)
    return MergedDrafter(
        [first(target_model, rng), second(target_model, rng)],
        pass_cost=rng.choice([None, PassCost({1: 1.0, 64: 2.0}), PassCost({1: 1.0, 64: 64.0})]),
    )


# method name -> factory(target_model, rng) -> drafter
FACTORIES = {
    "ar": lambda model, rng: NoDrafter(),
    "draft": make_draft,
    "cross-vocab": make_cross_vocab,
    "pld": make_pld,
    "recycle": make_recycle,
    "rest": make_rest,
    "ngram-cache": make_ngram_cache,
    "lookahead": make_lookahead,
    "stand": make_stand,
    "pld+recycle": make_merged,
}


def test_every_method_is_covered():
    assert set(METHODS) <= set(FACTORIES), "register a test factory for every method"


def greedy_case(seed: int):
    rng = random.Random(seed)
    arch = rng.choice(["qwen2", "llama"])
    model = random_transformer(arch, seed=seed, vocab=48)
    tok = CharTokenizer(vocab=48)
    prompt = [rng.randrange(47) for _ in range(rng.randint(1, 20))]
    n = rng.randint(1, 40)
    ref = run(model, NoDrafter(), prompt, n, tok)
    # make an EOS likely inside a draft: the token greedy decoding emits around the middle
    if seed % 2 and len(ref.token_ids) > 3:
        tok.eos_token_ids = frozenset({ref.token_ids[len(ref.token_ids) // 2]})
        ref = run(model, NoDrafter(), prompt, n, tok)
    return rng, model, tok, prompt, n, ref


def check_same(got, ref):
    assert got.token_ids == ref.token_ids
    assert got.text == ref.text
    assert got.finish_reason == ref.finish_reason
    assert got.stats.target_passes <= ref.stats.target_passes


def run(model, drafter, prompt, n, tok, sampling=SamplingParams()):
    res = Generation()
    engine = Engine(NativeTarget(model, capacity=8), tok)
    text = "".join(
        engine.stream(prompt, max_new_tokens=n, sampling=sampling, drafter=drafter, result=res)
    )
    assert text == res.text
    return res


@pytest.mark.parametrize("method", sorted(FACTORIES))
@pytest.mark.parametrize("seed", range(16))
def test_greedy_equals_autoregressive(method, seed):
    rng, model, tok, prompt, n, ref = greedy_case(seed)
    check_same(run(model, FACTORIES[method](model, rng), prompt, n, tok), ref)


@pytest.mark.parametrize("shape", ["static", "dynamic"])
@pytest.mark.parametrize("seed", range(100, 110))
def test_draft_trees_greedy_equal_autoregressive(shape, seed):
    rng, model, tok, prompt, n, ref = greedy_case(seed)
    check_same(run(model, make_draft(model, rng, shape), prompt, n, tok), ref)


def test_draft_with_identical_model_accepts_everything():
    model = random_transformer("qwen2", seed=5, vocab=48)
    tok = CharTokenizer(vocab=1000)  # no EOS
    drafter = DraftModelDrafter(NativeTarget(perturbed_copy(model, 0.0)), 48, num_draft_tokens=4)
    res = run(model, drafter, [1, 2, 3], 21, tok)
    # prefill gives 1 token, then each pass commits 4 drafted + 1 bonus
    assert res.stats.target_passes == 1 + 4
    assert res.stats.accepted == res.stats.drafted == 16
    assert res.stats.tau == pytest.approx(21 / 5)


def test_draft_over_a_vocabulary_subset():
    """``draft_vocab``: the draft's head over some token ids only; it proposes none of the
    others, its logits there are -inf, and the output is the target's."""
    model = random_transformer("qwen2", seed=5, vocab=48)
    tok = CharTokenizer(vocab=1000)  # no EOS
    rows = torch.arange(0, 48, 2)
    draft = VocabSubset(NativeTarget(perturbed_copy(model, 0.0)), rows)
    logits = draft.forward([1, 2, 3])
    assert logits.shape == (3, 48) and torch.isinf(logits[:, 1::2]).all()
    assert torch.equal(logits[:, rows], NativeTarget(model).forward([1, 2, 3])[:, rows])
    drafter = DraftModelDrafter(draft, 48, num_draft_tokens=4)
    res = run(model, drafter, [1, 2, 3], 30, tok)
    assert res.token_ids == run(model, NoDrafter(), [1, 2, 3], 30, tok).token_ids
    odd = sum(t % 2 for t in res.token_ids)  # the target's odd tokens are never drafted
    assert res.stats.accepted <= len(res.token_ids) - odd


def test_adaptive_length_and_confidence_policy():
    policy = AdaptiveLength(4, k_max=8)
    policy.observe(4, 4)
    assert policy.length() == 6
    policy.observe(6, 6)
    policy.observe(8, 8)
    assert policy.length() == 8  # capped
    policy.observe(8, 2)
    assert policy.length() == 7
    assert FixedLength(3, confidence=0.5).keep_going(0.6)
    assert not FixedLength(3, confidence=0.5).keep_going(0.4)


def test_confidence_stops_drafts_early():
    model = random_transformer("qwen2", seed=5, vocab=48)
    tok = CharTokenizer(vocab=1000)
    drafter = DraftModelDrafter(
        NativeTarget(perturbed_copy(model, 0.0)), 48, policy=FixedLength(6, confidence=0.999)
    )
    res = run(model, drafter, [1, 2, 3], 20, tok)
    assert res.stats.drafted < 6 * (res.stats.target_passes - 1)
    assert res.token_ids == run(model, NoDrafter(), [1, 2, 3], 20, tok).token_ids


@pytest.mark.parametrize("seed", range(6))
def test_tree_drafts_are_greedy_exact(seed):
    rng = random.Random(100 + seed)
    model = random_transformer(rng.choice(["qwen2", "llama"]), seed=seed, vocab=48)
    tok = CharTokenizer(vocab=48)
    prompt = [rng.randrange(47) for _ in range(rng.randint(1, 12))]
    branching = [rng.randint(1, 3) for _ in range(rng.randint(1, 4))]
    drafter = DraftModelDrafter(
        NativeTarget(perturbed_copy(model, 0.05, seed=seed)), 48, branching=branching
    )
    got = run(model, drafter, prompt, 30, tok)
    assert got.token_ids == run(model, NoDrafter(), prompt, 30, tok).token_ids
    assert got.stats.drafted > 0


def test_tree_from_an_identical_draft_is_accepted_to_full_depth():
    model = random_transformer("llama", seed=7, vocab=48)
    tok = CharTokenizer(vocab=1000)  # no EOS
    drafter = DraftModelDrafter(NativeTarget(perturbed_copy(model, 0.0)), 48, branching=[2, 2, 1])
    res = run(model, drafter, [3, 1, 4], 25, tok)
    # each pass: 2 + 4 + 4 nodes drafted, the greedy path (3 deep) accepted, plus the bonus
    assert res.stats.drafted == 10 * (res.stats.target_passes - 1)
    assert res.stats.accepted == 3 * (res.stats.target_passes - 1)


@pytest.mark.parametrize(
    "siblings,verify",
    [("iid", "spectr"), ("without_replacement", "specinfer"), ("beam", "specinfer")],
)
def test_multi_draft_trees_are_greedy_exact(siblings, verify):
    """SpecTr and RSD trees under greedy: top-k siblings (beam: beam search), exact output."""
    model = random_transformer("qwen2", seed=11, vocab=48)
    tok = CharTokenizer(vocab=1000)  # no EOS
    drafter = DraftModelDrafter(
        NativeTarget(perturbed_copy(model, 0.02, seed=3)),
        48,
        branching=[3, 2, 2],
        sibling_sampling=siblings,
        verify=verify,
    )
    got = run(model, drafter, [5, 9, 2, 7], 30, tok)
    assert got.token_ids == run(model, NoDrafter(), [5, 9, 2, 7], 30, tok).token_ids
    assert got.stats.accepted >= 10


def test_multi_draft_options_pick_their_verifier_and_are_validated():
    model = random_transformer("llama", seed=7, vocab=48)
    draft = NativeTarget(perturbed_copy(model, 0.1))
    t1 = SamplingParams(temperature=1.0)
    spectr = DraftModelDrafter(draft, 48, branching=[2, 2], verify="spectr")
    assert isinstance(spectr.verifier(t1), SpecTrVerifier)
    assert spectr.verifier(SamplingParams()) is None  # greedy: the engine's greedy verifier
    rsd = DraftModelDrafter(draft, 48, branching=[2, 2], sibling_sampling="without_replacement")
    assert rsd.verifier(t1) is None  # RSD: plain recursive rejection sampling
    for bad in [
        dict(sibling_sampling="beam"),  # no tree
        dict(verify="spectr"),
        dict(branching=[2], sibling_sampling="without_replacement", verify="spectr"),
        dict(branching=[2], sibling_sampling="nope"),
        dict(branching=[2], verify="nope"),
    ]:
        with pytest.raises(InvalidRequestError):
            DraftModelDrafter(draft, 48, **bad)

    class Context:  # combinations are refused before any model is loaded
        vocab_size = 48

        def load_draft(self, spec):
            raise AssertionError("loaded a draft model for a refused combination")

    method = METHODS["draft"]
    for opts, message in [
        ({"siblings": "beam"}, "static tree"),
        ({"verifier": "spectr", "tree": "dynamic"}, "static tree"),
        ({"siblings": "without_replacement", "tree": "2,2", "verifier": "spectr"}, "siblings=iid"),
        ({"siblings": "sideways", "tree": "2,2"}, "one of iid, without-replacement, beam"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            method.build(Context(), method.validate({"draft_model": "x", **opts}))
