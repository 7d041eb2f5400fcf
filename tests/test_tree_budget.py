"""Hardware-aware tree sizing: pass-cost curves, the budget policy, dynamic trees."""

import json
import time

import pytest
from random_models import CharTokenizer, perturbed_copy, random_transformer

from specdec.engine import Engine, Generation
from specdec.models.pass_cost import (
    DEFAULT_SIZES,
    PassCost,
    cached_pass_cost,
    measure_pass_cost,
)
from specdec.models.target import NativeTarget
from specdec.speculation.drafters.draft_model import DraftModelDrafter
from specdec.speculation.sizing import TreeBudget
from specdec.speculation.tree import DraftTree


def test_pass_cost_interpolates_and_extrapolates():
    c = PassCost({1: 10.0, 4: 13.0, 8: 21.0})
    assert c(1) == 10.0 and c(0) == 10.0
    assert c(2) == pytest.approx(11.0)
    assert c(6) == pytest.approx(17.0)
    assert c(12) == pytest.approx(29.0)  # the last segment's slope, 2 ms per token
    assert c.relative()[8] == pytest.approx(2.1)


def test_pass_cost_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    target = NativeTarget(random_transformer("qwen2", vocab=48))
    curve = measure_pass_cost(target, sizes=(1, 4), context=8, repeats=1)
    assert set(curve.ms) == {1, 4} and all(v > 0 for v in curve.ms.values())
    assert target.length == 0
    first = cached_pass_cost(target, "toy|float64", sizes=(1, 2), progress=False)
    files = list((tmp_path / "pass_cost").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["identity"] == "toy|float64"
    files[0].write_text(json.dumps({"ms": {"1": 5.0, "2": 6.0}}))  # read back, not re-measured
    assert cached_pass_cost(target, "toy|float64", sizes=(1, 2), progress=False).ms == {
        1: 5.0,
        2: 6.0,
    }
    assert first.ms != {1: 5.0, 2: 6.0}


class _SlowTarget:
    """A target whose pass over n tokens sleeps ``per_token`` seconds per token (bfloat16
    on a CPU without native bfloat16 behaves so), counting the tokens it is given."""

    class config:
        vocab_size = 16

    max_length = 4096

    def __init__(self, per_token: float) -> None:
        self.per_token, self.length, self.prefilled, self.passes = per_token, 0, 0, []

    def forward(self, tokens, logits_rows=None):
        time.sleep(self.per_token * len(tokens))
        if logits_rows is not None:
            self.prefilled += len(tokens)
        else:
            self.passes.append(len(tokens))
        self.length += len(tokens)

    def rollback(self, n):
        self.length -= n

    def reset(self):
        self.length = 0


def test_pass_cost_measurement_is_bounded():
    # linear costs: sizes stop at the first that costs 8 one-token passes, and no second
    # round fits in the budget; the cache's prefill stops at a quarter of the budget
    slow = _SlowTarget(0.01)
    curve = measure_pass_cost(slow, budget_s=0.4)
    sizes = list(curve.ms)
    assert sizes == list(DEFAULT_SIZES[: len(sizes)]) and sizes[-1] in (8, 12)
    assert curve(sizes[-1]) >= 8 * curve(1) > curve(sizes[-2])
    # the stopping size confirmed by timing it and a one-token pass again
    again = [1, 1, sizes[-1], sizes[-1]]
    assert slow.passes == [n for n in sizes for _ in range(2)] + again and slow.length == 0
    assert 0 < slow.prefilled < 256
    # flat-ish costs within the budget: every size, three rounds, the whole cache
    fast = _SlowTarget(0.0)
    assert list(measure_pass_cost(fast, budget_s=60).ms) == list(DEFAULT_SIZES)
    assert len(fast.passes) == 2 * 3 * len(DEFAULT_SIZES) and fast.prefilled == 256


class _HiccupTarget(_SlowTarget):
    """Flat costs, but the first timed pass over 6 tokens is slowed (another process)."""

    def forward(self, tokens, logits_rows=None):
        hiccup = logits_rows is None and len(tokens) == 6 and self.passes.count(6) == 1
        super().forward(tokens, logits_rows)
        if hiccup:
            time.sleep(0.05)


def test_one_slow_pass_does_not_cut_the_curve():
    curve = measure_pass_cost(_HiccupTarget(0.0), budget_s=60)
    assert list(curve.ms) == list(DEFAULT_SIZES) and curve(6) < 5


def test_budget_prefers_big_trees_when_passes_are_flat():
    probs = [0.9, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05]
    flat = TreeBudget(PassCost({1: 100.0, 64: 100.0}), PassCost({1: 10.0}))
    steep = TreeBudget(PassCost({1: 100.0, 2: 200.0, 64: 6400.0}), PassCost({1: 10.0}))
    assert flat.best_size(probs, 30.0)[0] == len(probs)
    assert steep.best_size(probs, 0.0)[0] == 0  # a second token doubles the pass: never worth it
    capped = TreeBudget(PassCost({1: 100.0, 64: 100.0}), PassCost({1: 10.0}), max_nodes=3)
    assert capped.best_size(probs, 30.0)[0] == 3
    assert flat.worth_expanding(probs[:2], 30.0, [0.9, 0.8], spread=0.9)
    assert not steep.worth_expanding(probs[:2], 0.0, [0.9, 0.8], spread=0.9)
    assert not flat.worth_expanding(probs[:2], 30.0, [1e-4, 1e-5], spread=0.9)  # no gain


def test_budget_plans_with_the_cheapest_pass_over_at_least_n():
    # one row costs more than four (bf16 kernels): a 1-node tree is priced like a 4-node one
    b = TreeBudget(PassCost({1: 140.0, 4: 120.0, 8: 150.0}), PassCost({1: 50.0}))
    assert b.verify_ms(1) == b.verify_ms(4) == 120.0 and b.verify_ms(6) == 135.0


def test_budget_calibrates_to_what_is_accepted():
    b = TreeBudget(PassCost({1: 1.0}), PassCost({1: 1.0}))
    for _ in range(200):
        b.observe(predicted=4.0, accepted=2)
    assert b.calibration == pytest.approx(0.5, abs=0.02)


def test_subtree_reindexes():
    t = DraftTree([5, 6, 7, 8], [-1, 0, 0, 2])
    s = t.subtree([0, 2, 3])
    assert s.tokens == [5, 7, 8] and s.parents == [-1, 0, 1]
    with pytest.raises(ValueError):
        t.subtree([0, 3])


def test_dynamic_tree_with_identical_draft_goes_deep():
    model = random_transformer("qwen2", seed=5, vocab=48)
    model.lm_head.weight.mul_(30)  # confident: path probabilities stay high along a path
    budget = TreeBudget(PassCost({1: 1.0, 64: 1.0}), PassCost({1: 0.01}), max_nodes=16)
    drafter = DraftModelDrafter(
        NativeTarget(perturbed_copy(model, 0.0)), 48, tree_budget=budget, width=2, max_depth=5
    )
    res = Generation()
    engine = Engine(NativeTarget(model), CharTokenizer(vocab=1000))
    "".join(engine.stream([1, 2, 3], max_new_tokens=25, drafter=drafter, result=res))
    assert res.stats.tau > 4  # whole depth-5 paths accepted
    assert res.stats.drafted > 5 * (res.stats.target_passes - 1)  # more than a chain: a tree
