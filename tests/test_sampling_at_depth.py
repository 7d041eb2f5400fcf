"""The contract suite's sampling mode: every lossless method of the method table, built as
users build it (`get_method(name).build(ctx, options)`), samples through the engine with
exactly the target's distribution, at depth.

The target is a 2-layer random float64 model over 4 tokens, the last of them
end-of-sequence (about 11% a step), generating up to 6 tokens after a prompt with
repeats (so lookups find matches). The prefill gives the first token, so the
first pass may verify up to 4 drafted levels, and a sequence takes several passes;
sequences that end early are complete outcomes too (keyed up to and including the
EOS). Every complete outcome's exact probability is enumerated from the target's
float64 rows (364 prefixes; 1,093 outcomes). Seeded runs of each method are
compared with it by Pearson's chi-square (cells with expected count < 5 pooled), at
ALPHA = 0.001.

Power, stated per size in DETECTS_TV and checked by `test_stated_detectable_sizes`:
the smallest total variation (on the pooled cells) that the test detects with
probability >= 95% whatever the error's direction (`exactness_stats`). The default run
takes RUNS per method; ``pytest -m slow`` takes SLOW_RUNS. `test_planted_bug_at_the_stated_size`
shows a drafter defect of that size failing at the same run count.
"""

from __future__ import annotations

import functools
import random
import tempfile

import pytest
import torch
from exactness_stats import (
    chain_outcomes,
    chi2_pvalue,
    min_detectable_tv,
    noncentrality,
    pooled_mass,
    pooled_tv,
    target_outcomes,
    total_variation,
)
from random_models import (
    CharTokenizer,
    ChunkTokenizer,
    chunk_vocabulary,
    full_logits,
    perturbed_copy,
    random_transformer,
    remap_vocab,
)
from test_contract import context, eagle_head, switching
from test_sampling_exactness import one_thread  # noqa: F401 (autouse: one thread, tiny models)

from specdec.engine import Decoding, Engine, Generation, run_pass
from specdec.models.pass_cost import PassCost
from specdec.models.target import NativeTarget
from specdec.speculation import datastore
from specdec.speculation.drafters.base import Drafter
from specdec.speculation.methods import METHODS, get_method
from specdec.speculation.sampling import SamplingParams, probabilities

V, N, EOS = 4, 6, 3  # ids 0-2 and EOS; CharTokenizer(4) makes the last id its EOS
PROMPT = [0, 1, 2, 0, 1, 2, 0]
ALPHA = 0.001
RUNS = 600  # per method in the default run (about 5 s each)
SLOW_RUNS = 10_000  # per method under -m slow
# the smallest TV detected with probability >= 95% in any direction (min_detectable_tv at
# ALPHA, the larger of the two sampling settings), rounded up; checked below
DETECTS_TV = {RUNS: 0.16, SLOW_RUNS: 0.056}

T1 = SamplingParams(temperature=1.0, seed=0)
SHAPED = SamplingParams(temperature=1.2, top_k=3, top_p=0.95, seed=0)
FLAT = PassCost({1: 1.0, 64: 2.0})  # a pass costs little more with more tokens: big trees
# the same shape in seconds: the head sets weigh their measured guessing time (ms) against
# the pass cost, and a millisecond of Python would outweigh FLAT's pass
FLAT_SLOW = PassCost({1: 1000.0, 64: 2000.0})
HEAD_SETS = ("medusa", "hydra", "clover", "chimera", "falcon")


@functools.cache
def target_model():
    return random_transformer("qwen2", seed=5, vocab=V, layers=2)


@functools.cache
def draft_model():
    return perturbed_copy(target_model(), 0.3, seed=1)


def rows(model, params: SamplingParams):
    """The shaped next-token row after PROMPT + a prefix (memoised per prefix)."""

    @functools.cache
    def row(prefix: tuple[int, ...]) -> torch.Tensor:
        return probabilities(full_logits(model, PROMPT + list(prefix))[-1], params)

    return row


@functools.cache
def exact(params: SamplingParams) -> dict[tuple[int, ...], float]:
    return target_outcomes(rows(target_model(), params), N, frozenset({EOS}))


_STORE: list[str] = []


def rest_datastore(tok) -> str:
    """A small REST datastore: documents sampled from the target (so spans match), EOS
    included, written once per session."""
    if not _STORE:
        g = torch.Generator().manual_seed(7)
        row = rows(target_model(), T1)
        docs = []
        for _ in range(30):
            doc: list[int] = []
            while len(doc) < 8:  # a document of the target's text, across EOS tokens
                doc.append(int(torch.multinomial(row(tuple(doc[-5:])), 1, generator=g)))
            docs.append(PROMPT[-3:] + doc)
        folder = tempfile.mkdtemp(prefix="specdec-test-depth-") + "/store"
        datastore.write(docs, folder, datastore.tokenizer_fingerprint(tok))
        _STORE.append(folder)
    return _STORE[0]


def cross_vocab_draft(tok):
    """A draft over chunks of the target's letters (other ids, some tokens two or three
    letters), predicting like the target perturbed; its end token is the target's."""
    pieces = chunk_vocabulary(tok.decode(range(V)), 6, seed=3)
    dtok = ChunkTokenizer(pieces, eos=[pieces.index("D")])
    old = [tok.encode(p)[0] if len(p) == 1 else None for p in pieces]
    return NativeTarget(remap_vocab(draft_model(), old, seed=2), capacity=48), dtok


@functools.cache
def random_head(version: str = "1") -> str:
    """An EAGLE head for the target: random, so that its q differs from the target's p."""
    return eagle_head(target_model(), seed=4, version=int(version))


@functools.cache
def random_heads(kind: str) -> str:
    """Medusa, Hydra, Clover, Chimera or Falcon heads for the target: random, with recorded accuracies (a
    tree of 3 levels); the sequential kinds' weights large, so that paths reach depth 2."""
    from specdec.models.chimera_heads import ChimeraHeads
    from specdec.models.clover_heads import CloverHeads
    from specdec.models.falcon_heads import FalconHeads
    from specdec.models.hydra_heads import HydraHeads
    from specdec.models.medusa_heads import MedusaHeads

    heads_class, seed, scale = {"medusa": (MedusaHeads, 6, 0.3), "hydra": (HydraHeads, 7, 1.0),
                                "clover": (CloverHeads, 10, 1.0),
                                "chimera": (ChimeraHeads, 11, 1.0),
                                "falcon": (FalconHeads, 12, 1.0)}[kind]  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    heads = heads_class.for_target(target_model(), "random", num_heads=3)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    heads.config.accuracy = [[0.6, 0.3, 0.1], [0.5, 0.3, 0.1], [0.4, 0.3, 0.1]]
    folder = tempfile.mkdtemp(prefix=f"specdec-test-{kind}-") + "/heads"
    heads.save(folder)
    return folder


def build(method: str, options: dict, tok) -> Drafter:
    """``method`` with ``options`` through the method table, on a context that has what it
    needs: the draft model, its tokenizer, the pass costs."""
    model, draft = target_model(), NativeTarget(draft_model(), capacity=48)
    opts = dict(options)
    if opts.pop("draft", False):
        opts["draft_model"] = "the-draft"
    if method == "cross-vocab":
        xdraft, dtok = cross_vocab_draft(tok)
        ctx = context(model, tok, draft=xdraft, draft_tokenizer=dtok)
    else:
        heads = any(kind in method.split("+") for kind in HEAD_SETS)
        cost = FLAT_SLOW if heads else FLAT
        ctx = context(model, tok, cost, draft=draft, draft_cost=PassCost({1: 0.05}))
    if "rest" in method.split("+"):
        opts["datastore"] = rest_datastore(tok)
    if "eagle" in method.split("+"):
        opts["head"] = random_head(opts.get("version", "1"))
    for kind in HEAD_SETS:
        if kind in method.split("+"):
            opts["heads"] = random_heads(kind)
    drafter = get_method(method).build(ctx, opts)
    return switching(drafter, seed=0) if method == "auto" else drafter


# name -> (method, options, sampling); "draft": True names the draft model
CASES: dict[str, tuple[str, dict, SamplingParams]] = {
    "ar": ("ar", {}, T1),
    "chain-k3": ("draft", {"draft": True, "num_draft_tokens": 3}, T1),
    "chain-k4-adaptive": (
        "draft",
        {"draft": True, "num_draft_tokens": 4, "adaptive": True},
        SHAPED,
    ),
    "chain-k5-confidence": ("draft", {"draft": True, "num_draft_tokens": 5, "confidence": 0.4}, T1),
    "tree-2,2,1": ("draft", {"draft": True, "tree": "2,2,1"}, T1),
    "tree-dynamic": (
        "draft",
        {"draft": True, "tree": "dynamic", "tree_width": 2, "tree_depth": 4, "tree_nodes": 10},
        SHAPED,
    ),
    "spectr-2,2,1": ("draft", {"draft": True, "tree": "2,2,1", "verifier": "spectr"}, T1),
    "rsd-c-3,2,1": (
        "draft",
        {"draft": True, "tree": "3,2,1", "siblings": "without-replacement"},
        SHAPED,
    ),
    "rsd-s-3,2,1": ("draft", {"draft": True, "tree": "3,2,1", "siblings": "beam"}, T1),
    # the draft's logits over ids 0, 1 and EOS only: it never proposes 2, its q is 0 there
    "draft-vocab-2": ("draft", {"draft": True, "num_draft_tokens": 3, "draft_vocab": 2}, SHAPED),
    "cross-vocab": ("cross-vocab", {"draft": True, "num_draft_tokens": 3}, T1),
    "pld": ("pld", {"num_draft_tokens": 4, "min_ngram": 1, "max_ngram": 2}, T1),
    "ngram-cache": ("ngram-cache", {"min_ngram": 1, "max_ngram": 2, "min_share": 0.0}, T1),
    "recycle": ("recycle", {"top_k": 2, "max_depth": 4}, T1),
    "stand": ("stand", {"top_k": 3, "max_ngram": 2, "max_depth": 4}, SHAPED),
    "lookahead": ("lookahead", {"window": 3, "ngram": 3, "guesses": 3}, T1),
    "rest": ("rest", {"min_span": 1, "max_span": 3, "continuation": 4}, T1),
    "pld+recycle-joint": ("pld+recycle", {"top_k": 2, "max_depth": 4, "joint": True}, SHAPED),
    # a draft model's sampled chain beside STAND's sampled siblings, each sized alone
    "draft+stand-separate": (
        "draft+stand",
        {"draft": True, "num_draft_tokens": 3, "top_k": 2, "max_depth": 3, "joint": False},
        T1,
    ),
    "rest+recycle+stand-joint": (
        "rest+recycle+stand",
        {"min_span": 1, "top_k": 2, "max_depth": 3, "joint": True},
        SHAPED,
    ),
    # an EAGLE head (random) on the target's features: chains and trees of its samples
    "eagle-chain-k3": ("eagle", {"num_draft_tokens": 3, "tree": "none"}, T1),
    "eagle-tree-2,2,1": ("eagle", {"tree": "2,2,1", "siblings": "without-replacement"}, SHAPED),
    "eagle3-tree-2,1": ("eagle", {"version": "3", "tree": "2,1"}, T1),
    "eagle-dynamic+pld": (
        "eagle+pld",
        {"tree": "dynamic", "tree_width": 2, "tree_depth": 3, "min_ngram": 1, "max_ngram": 2,
         "joint": True},
        T1,
    ),
    # Medusa heads (random): a static tree of their top guesses, points masses under sampling
    "medusa-tree": ("medusa", {"top_k": 3, "max_nodes": 12}, SHAPED),
    "hydra-tree": ("hydra", {"top_k": 3, "max_nodes": 12}, SHAPED),
    "clover-tree": ("clover", {"top_k": 3, "max_nodes": 12}, SHAPED),
    "chimera-tree": ("chimera", {"top_k": 3, "max_nodes": 12}, SHAPED),
    "falcon-tree": ("falcon", {"top_k": 3, "max_nodes": 12}, SHAPED),
    # auto switching at random steps among a draft model's sampled chain, prompt lookup and
    # Token Recycling (`test_contract.switching`)
    "auto-switching": (
        "auto",
        {"draft": True, "drafters": "pld,recycle,draft", "num_draft_tokens": 3},
        SHAPED,
    ),
}


def capped_stream(target, tok, drafter, sampling, result, caps: random.Random) -> None:
    """`Engine.stream` as the batch engine drives a request under goodput control: each
    step's tree capped at a node count drawn from ``caps`` (none, 0 = the drafter skipped,
    1-3 nodes: trees the drafter made bigger are cut to their best nodes)."""
    d = Decoding(target, tok, PROMPT, max_new_tokens=N, sampling=sampling, drafter=drafter, result=result)
    try:
        d.start(*run_pass(target, d.prefill()))
        while not d.done:
            d.verified(*run_pass(target, d.propose(caps.choice([None, 0, 1, 2, 3]))))
    finally:
        d.close()


def sample_outcomes(
    drafter: Drafter, params: SamplingParams, runs: int, caps: random.Random | None = None
):
    """Counts of complete outcomes over ``runs`` seeded generations (one drafter for all,
    so what it learns carries over), and the most tokens one pass accepted, on average over
    a run's passes, in any run. ``caps``: each step's tree capped at random (`capped_stream`)."""
    tok = CharTokenizer(vocab=V)
    target = NativeTarget(target_model(), capacity=32)
    engine = Engine(target, tok)
    counts: dict[tuple[int, ...], int] = {}
    deepest = 0.0
    for r in range(runs):
        res = Generation()
        p = SamplingParams(params.temperature, params.top_p, params.top_k, seed=params.seed + r)
        if caps is not None:
            capped_stream(target, tok, drafter, p, res, caps)
        else:
            for _ in engine.stream(PROMPT, max_new_tokens=N, sampling=p, drafter=drafter, result=res):
                pass
        key = tuple(res.token_ids)
        counts[key] = counts.get(key, 0) + 1
        if res.stats.target_passes > 1:
            deepest = max(deepest, res.stats.accepted / (res.stats.target_passes - 1))
    return counts, deepest


def check_case(case: str, runs: int, caps: random.Random | None = None) -> None:
    method, options, params = CASES[case]
    drafter = build(method, options, CharTokenizer(vocab=V))
    counts, deepest = sample_outcomes(drafter, params, runs, caps)
    probs = exact(params)
    assert set(counts) <= set(probs), "an outcome the target cannot produce"
    pvalue = chi2_pvalue(counts, probs)
    assert pvalue > ALPHA, f"{case}: chi-square p = {pvalue:.2e} ({runs} runs)"
    if method != "ar":  # drafts verified at depth: some run accepted 2 levels a pass
        assert deepest >= 2, f"{case}: at most {deepest:.2f} tokens accepted a pass"


@pytest.mark.parametrize("case", list(CASES))
def test_method_samples_the_target_distribution(case):
    """RUNS seeded runs; detects a TV error of DETECTS_TV[RUNS] with 95% probability."""
    check_case(case, RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_method_samples_the_target_distribution_full_size(case):
    """SLOW_RUNS seeded runs; detects a TV error of DETECTS_TV[SLOW_RUNS] with 95%
    probability."""
    check_case(case, SLOW_RUNS)


# trees that goodput control may cut to their best nodes: sampled siblings (iid, without
# replacement, beams), dynamic trees, merges sized jointly, auto switching
CAPPED = [
    "tree-dynamic",
    "spectr-2,2,1",
    "rsd-c-3,2,1",
    "stand",
    "eagle-tree-2,2,1",
    "medusa-tree",
    "hydra-tree",
    "clover-tree",
    "chimera-tree",
    "falcon-tree",
    "auto-switching",
]


@pytest.mark.parametrize("case", CAPPED)
def test_method_samples_the_target_distribution_under_goodput_caps(case):
    """As the server runs a request under load: each step's tree capped at random.
    RUNS seeded runs; detects a TV error of DETECTS_TV[RUNS] with 95% probability."""
    check_case(case, RUNS, random.Random(1))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_method_samples_the_target_distribution_under_goodput_caps_full_size(case):
    check_case(case, SLOW_RUNS, random.Random(1))


def test_every_lossless_method_is_covered():
    """Each lossless method of the table, each way a draft model's tree is drawn and
    verified, and merges sized jointly and apart, have a case here."""
    names = {part for method, _, _ in CASES.values() for part in method.split("+")}
    assert {n for n, d in METHODS.items() if d.lossless} <= names, "add a sampling case"
    drawn = [o for m, o, _ in CASES.values() if "draft" in m.split("+")]
    assert {o.get("siblings", "iid") for o in drawn if "tree" in o} >= {
        "iid",
        "without-replacement",
        "beam",
    }
    assert any(o.get("verifier") == "spectr" for o in drawn)
    assert any(o.get("tree") == "dynamic" for o in drawn)
    assert any(o.get("draft_vocab") for o in drawn)
    assert any(o.get("adaptive") for o in drawn) and any(o.get("confidence") for o in drawn)
    merges = [o for m, o, _ in CASES.values() if "+" in m]
    assert {o["joint"] for o in merges} == {True, False}


def test_outcomes_end_early_and_run_deep():
    """The enumeration has what the test needs: sequences that end with EOS before N
    tokens (a good share of the probability) and ones that run the full length."""
    probs = exact(T1)
    assert abs(sum(probs.values()) - 1) < 1e-12
    early = sum(p for s, p in probs.items() if len(s) < N)
    assert 0.2 < early < 0.8
    assert len(probs) == sum(3**i for i in range(N)) + 3**N  # every outcome is possible


def test_stated_detectable_sizes():
    """DETECTS_TV is what `min_detectable_tv` computes for these tests (rounded up), and the
    pooled cell holds little of the probability."""
    for runs, stated in DETECTS_TV.items():
        sizes = [min_detectable_tv(exact(p), runs, ALPHA) for p in (T1, SHAPED)]
        assert stated - 0.01 < max(sizes) <= stated, (runs, sizes)
        assert max(pooled_mass(exact(p), runs) for p in (T1, SHAPED)) < 0.5


class MisreportedQ(Drafter):
    """Planted defect: the production chain's nodes are drawn from q but report
    ``(1 - w) q + w * uniform`` to the verifier."""

    def __init__(self, inner: Drafter, weight: float) -> None:
        self.inner, self.weight = inner, weight

    def reset(self, prompt_ids):
        self.inner.reset(prompt_ids)

    def propose(self, state):
        tree = self.inner.propose(state)
        tree.q = [
            None if q is None else (1 - self.weight) * q + self.weight / len(q) for q in tree.q
        ]
        return tree

    def observe(self, state, tree, outcome):
        self.inner.observe(state, tree, outcome)


def misreported_outcomes(weight: float) -> dict[tuple[int, ...], float]:
    """The exact distribution the defect gives a chain of 3 (cut to the budget), at T1."""
    p, q = rows(target_model(), T1), rows(draft_model(), T1)
    return chain_outcomes(
        p,
        q,
        lambda done: min(3, N - done - 1),
        N,
        frozenset({EOS}),
        reported_q=lambda s: (1 - weight) * q(s) + weight / V,
    )


# the defect's weight whose induced TV on the test's pooled cells is just above DETECTS_TV
# at each size (from misreported_outcomes; checked in the test). On all outcomes its TV is
# 0.24 at weight 0.6 and 0.059 at 0.16.
PLANTED_WEIGHT = {RUNS: 0.6, SLOW_RUNS: 0.16}


def check_planted(runs: int) -> None:
    weight = PLANTED_WEIGHT[runs]
    wrong = misreported_outcomes(weight)
    tv, seen = total_variation(wrong, exact(T1)), pooled_tv(exact(T1), wrong, runs)
    assert DETECTS_TV[runs] <= seen < 1.1 * DETECTS_TV[runs], seen
    drafter = MisreportedQ(
        build("draft", {"draft": True, "num_draft_tokens": 3}, CharTokenizer(vocab=V)), weight
    )
    counts, _ = sample_outcomes(drafter, T1, runs)
    pvalue = chi2_pvalue(counts, exact(T1))
    lam = noncentrality(exact(T1), wrong, runs)
    print(
        f"misreported q, weight {weight}: TV {tv:.4f} (pooled {seen:.4f}), noncentrality {lam:.1f}, p = {pvalue:.2e}"
    )
    assert pvalue < ALPHA, f"a defect of TV {seen:.3f} passed: p = {pvalue:.3f}"


def test_chain_outcomes_of_the_correct_sampler_are_the_target():
    """The enumeration that sizes planted defects gives the target's distribution for the
    correct sampler (so a defect's TV is the defect's)."""
    right = chain_outcomes(
        rows(target_model(), T1),
        rows(draft_model(), T1),
        lambda done: min(3, N - done - 1),
        N,
        frozenset({EOS}),
    )
    assert total_variation(right, exact(T1)) < 1e-12


def test_planted_bug_at_the_stated_size():
    """A chain's q misreported to the verifier, the error on the test's cells just above
    DETECTS_TV[RUNS], fails the default-size test (p < ALPHA)."""
    check_planted(RUNS)


@pytest.mark.slow
def test_planted_bug_at_the_stated_size_full_size():
    check_planted(SLOW_RUNS)
