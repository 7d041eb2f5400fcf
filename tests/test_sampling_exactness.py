"""Sampling through the whole engine has exactly the target's distribution.

A 2-layer random model with a vocabulary of 6 generates 3 tokens; the exact
probability of each of the 216 sequences is enumerated from the target's
shaped distributions. 20,000 seeded runs of a method are compared with it by
Pearson's chi-square (cells with expected count < 5 pooled), passing at
p > 0.001. The drafter is a perturbed copy of the target, so drafts are often
but not always accepted.
"""

import itertools

import pytest
import torch
from random_models import CharTokenizer, full_logits, perturbed_copy, random_transformer

from specdec.engine import Engine, Generation
from specdec.models.pass_cost import PassCost
from specdec.models.target import NativeTarget, VocabSubset
from specdec.speculation.drafters.base import NoDrafter
from specdec.speculation.drafters.draft_model import DraftModelDrafter
from specdec.speculation.drafters.lookahead import LookaheadDrafter
from specdec.speculation.drafters.merged import MergedDrafter
from specdec.speculation.drafters.prompt_lookup import PromptLookupDrafter
from specdec.speculation.drafters.stand import StandDrafter
from specdec.speculation.drafters.token_recycling import TokenRecyclingDrafter
from specdec.speculation.sampling import SamplingParams, probabilities

V, N, RUNS = 6, 3, 20_000
PROMPT = [1, 4, 2]


def chi2_pvalue(counts: dict, expected: dict) -> float:
    """Pearson chi-square p-value, pooling cells with expected count < 5."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for key, e in expected.items():
        if e < 5:
            pool_o, pool_e = pool_o + counts.get(key, 0), pool_e + e
        else:
            obs.append(counts.get(key, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = ((o - e) ** 2 / e).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def exact_distribution(model, params):
    probs = {}
    for seq in itertools.product(range(V), repeat=N):
        p = 1.0
        for i in range(N):
            row = probabilities(full_logits(model, PROMPT + list(seq[:i]))[-1], params)
            p *= float(row[seq[i]])
        probs[seq] = p
    return probs


def sample_counts(model, make_drafter, params, runs=RUNS):
    engine = Engine(NativeTarget(model, capacity=16), CharTokenizer(vocab=1000))
    drafter = make_drafter()
    counts: dict = {}
    rng_seed = params.seed
    for r in range(runs):
        res = Generation()
        p = SamplingParams(params.temperature, params.top_p, params.top_k, seed=rng_seed + r)
        for _ in engine.stream(PROMPT, max_new_tokens=N, sampling=p, drafter=drafter, result=res):
            pass
        key = tuple(res.token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation (4x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STEEP = PassCost({1: 1.0, 64: 8.0})  # +0.11 of a one-token pass per node

CASES = {
    "ar": lambda m: NoDrafter,
    "draft-k2": lambda m: lambda: DraftModelDrafter(NativeTarget(perturbed_copy(m, 0.3)), V, 2),
    "draft-tree-2,2": lambda m: (
        lambda: DraftModelDrafter(NativeTarget(perturbed_copy(m, 0.3)), V, branching=[2, 2])
    ),
    # SpecTr: i.i.d. siblings, K-SEQ verification (the drafter asks the engine for it)
    "draft-tree-2,2-spectr": lambda m: (
        lambda: DraftModelDrafter(
            NativeTarget(perturbed_copy(m, 0.3)), V, branching=[2, 2], verify="spectr"
        )
    ),
    # RSD-C: siblings without replacement; RSD-S: stochastic beam search of width 3
    "draft-tree-3,2-rsd-c": lambda m: (
        lambda: DraftModelDrafter(
            NativeTarget(perturbed_copy(m, 0.3)),
            V,
            branching=[3, 2],
            sibling_sampling="without_replacement",
        )
    ),
    "draft-tree-3,2-rsd-s": lambda m: (
        lambda: DraftModelDrafter(
            NativeTarget(perturbed_copy(m, 0.3)), V, branching=[3, 2], sibling_sampling="beam"
        )
    ),
    # model-free drafters: deterministic tree nodes (point masses), the matrix and the
    # n-gram index carried from run to run
    "recycle": lambda m: lambda: TokenRecyclingDrafter(V, top_k=3, max_nodes=6),
    "lookahead": lambda m: lambda: LookaheadDrafter(window=2, ngram=3, guesses=2),
    # stochastic children without replacement, q = the stored entry minus earlier siblings
    "stand": lambda m: lambda: StandDrafter(V, top_k=4, max_ngram=2, max_nodes=6),
    "pld+recycle": lambda m: (
        lambda: MergedDrafter(
            [
                PromptLookupDrafter(num_draft_tokens=3, branches=2),
                TokenRecyclingDrafter(V, top_k=2, max_nodes=4),
            ]
        )
    ),
    # sized jointly on a steep pass cost: pld's and recycle's nodes cut by their scores, the
    # sampled STAND siblings (no scores) always kept beside them
    "pld+recycle+stand-joint": lambda m: (
        lambda: MergedDrafter(
            [
                PromptLookupDrafter(num_draft_tokens=3, branches=2, pass_cost=STEEP),
                TokenRecyclingDrafter(V, top_k=2, max_nodes=4, pass_cost=STEEP),
                StandDrafter(V, top_k=4, max_ngram=2, max_nodes=3),
            ],
            pass_cost=STEEP,
        )
    ),
    # the draft's logits over a subset of the vocabulary (``draft_vocab``): it never proposes
    # tokens 1, 4 or 5, and its q is zero there
    "draft-k3-vocab-subset": lambda m: (
        lambda: DraftModelDrafter(
            VocabSubset(NativeTarget(perturbed_copy(m, 0.3)), torch.tensor([0, 2, 3])), V, 3
        )
    ),
    "draft-k3-unrelated": lambda m: (
        lambda: DraftModelDrafter(
            NativeTarget(random_transformer("llama", seed=9, vocab=V, layers=1)), V, 3
        )
    ),
}


T1 = SamplingParams(temperature=1.0, seed=0)
SHAPED = SamplingParams(temperature=1.2, top_k=4, top_p=0.95, seed=0)


@pytest.mark.parametrize(
    "case,params",
    [
        ("ar", T1),
        ("draft-k2", T1),
        ("draft-k2", SHAPED),
        ("draft-tree-2,2", T1),
        ("draft-k3-unrelated", T1),
    ],
    ids=[
        "ar-t1",
        "draft-k2-t1",
        "draft-k2-t1.2-k4-p0.95",
        "draft-tree-2,2-t1",
        "draft-k3-unrelated-t1",
    ],
)
def test_engine_sampling_matches_target_distribution(case, params):
    torch.manual_seed(0)
    model = random_transformer("qwen2", seed=3, vocab=V, layers=2)
    exact = exact_distribution(model, params)
    assert abs(sum(exact.values()) - 1) < 1e-9
    counts = sample_counts(model, CASES[case](model), params)
    expected = {k: v * RUNS for k, v in exact.items()}
    pvalue = chi2_pvalue(counts, expected)
    assert pvalue > 0.001, f"{case}: chi-square p = {pvalue:.2e}"


MULTI_DRAFT_RUNS = 4_000  # fewer runs than above, to keep the suite short


@pytest.mark.parametrize(
    "case,params",
    [
        ("draft-tree-2,2-spectr", T1),
        ("draft-tree-3,2-rsd-c", SHAPED),
        ("draft-tree-3,2-rsd-s", T1),
        ("recycle", T1),
        ("pld+recycle", SHAPED),
        ("lookahead", T1),
        ("stand", T1),
        ("stand", SHAPED),
        ("draft-k3-vocab-subset", SHAPED),
        ("pld+recycle+stand-joint", SHAPED),
    ],
    ids=[
        "spectr-2,2-t1",
        "rsd-c-3,2-t1.2-k4-p0.95",
        "rsd-s-3,2-t1",
        "recycle-t1",
        "pld+recycle-t1.2-k4-p0.95",
        "lookahead-2,3,2-t1",
        "stand-t1",
        "stand-t1.2-k4-p0.95",
        "draft-vocab-subset-t1.2-k4-p0.95",
        "pld+recycle+stand-joint-t1.2-k4-p0.95",
    ],
)
def test_engine_multi_draft_sampling_matches_target_distribution(case, params):
    """SpecTr, Recursive Speculative Decoding, the model-free trees and a draft over a
    vocabulary subset through the engine:
    4,000 seeded runs,
    chi-square p > 0.001 against the enumerated target distribution."""
    torch.manual_seed(0)
    model = random_transformer("qwen2", seed=3, vocab=V, layers=2)
    exact = exact_distribution(model, params)
    counts = sample_counts(model, CASES[case](model), params, MULTI_DRAFT_RUNS)
    expected = {k: v * MULTI_DRAFT_RUNS for k, v in exact.items()}
    pvalue = chi2_pvalue(counts, expected)
    assert pvalue > 0.001, f"{case}: chi-square p = {pvalue:.2e}"


class MisreportingDrafter(DraftModelDrafter):
    """Planted bug: samples from its distribution but reports a flattened one to the verifier."""

    def propose(self, state):
        tree = super().propose(state)
        tree.q = [None if q is None else (q + 0.5) / (q + 0.5).sum() for q in tree.q]
        return tree


def test_planted_bug_is_detected():
    """The same check has power: a drafter that misreports q fails it (5,000 runs suffice)."""
    model = random_transformer("qwen2", seed=3, vocab=V, layers=2)
    exact = exact_distribution(model, T1)
    runs = 5_000
    counts = sample_counts(
        model, lambda: MisreportingDrafter(NativeTarget(perturbed_copy(model, 0.3)), V, 2), T1, runs
    )
    pvalue = chi2_pvalue(counts, {k: v * runs for k, v in exact.items()})
    assert pvalue < 0.001, f"planted bug not detected: p = {pvalue:.3f}"
