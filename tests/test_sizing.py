"""Tree sizing (`specdec.speculation.sizing`): which nodes pay on the pass-cost curve.

`TreeBudget` is tested with the dynamic draft trees in test_tree_budget.py."""

import math

import pytest

from specdec.models.pass_cost import PassCost
from specdec.speculation.sizing import (
    RankAcceptance,
    Revisit,
    ShareCalibration,
    TrieSizer,
    best_size,
)
from specdec.speculation.tree import DraftTree

FLAT = PassCost({1: 10.0, 64: 10.0})  # any pass costs one pass: every node with a chance pays
STEEP = PassCost({1: 10.0, 2: 20.0, 64: 640.0})  # a pass over n costs n passes: nothing pays
MILD = PassCost({1: 10.0, 2: 12.0, 4: 16.0, 8: 24.0})  # +2 ms a token


def test_best_size_maximises_tokens_per_pass_time():
    assert best_size([0.9, 0.5, 0.01], FLAT) == 3
    assert best_size([0.9, 0.5, 0.01], STEEP) == 0
    # MILD: 1 node: 1.9 / 14 > 1/12? a pass over 2 costs 12, over 3 14, over 4 16
    # n=0: 1/10; n=1: 1.9/12 = .158; n=2: 2.4/14 = .171; n=3: 2.41/16 = .151
    assert best_size([0.9, 0.5, 0.01], MILD) == 2
    assert best_size([], MILD) == 0
    # beside nodes the pass carries anyway, one more node costs less of the pass
    assert best_size([0.15], MILD, fixed=0) == 0  # 1.15/12 < 1/10
    assert best_size([0.15], MILD, fixed=3) == 1  # 1.15/18 > 1/16


def test_share_calibration_learns_tokens_per_share():
    c = ShareCalibration(prior=1.0, weight=4.0)
    assert c.factor("a") == 1.0  # the prior until told otherwise
    for _ in range(100):
        c.observe("a", predicted=1.0, accepted=0)  # retrieved, never accepted
        c.observe("b", predicted=0.5, accepted=1)  # accepted twice as often as its share
    assert c.factor("a") < 0.05 and c.factor("b") == pytest.approx(2.0, abs=0.1)
    assert c.factor("c") == 1.0  # keys apart


def test_revisit_drafts_every_nth_skipped_step():
    r = Revisit(every=4)
    assert [r.now("k") for _ in range(8)] == [False, False, False, True] * 2
    assert not r.now("other")


def test_rank_acceptance_counts_trials_of_children_of_accepted_nodes():
    ra = RankAcceptance(max_depth=3, ranks=2)
    before = ra.probs()
    # a root child of rank 0 accepted, its own children (ranks 0, 1) both rejected; the
    # rank-1 root child rejected, its child (never reachable) is not a trial
    parents, ranks = [-1, -1, 0, 0, 1], [0, 1, 0, 1, 0]
    for _ in range(50):
        ra.count(parents, ranks, path=[0])
    after = ra.probs()
    assert after[0][0] > before[0][0]  # depth 0, rank 0: accepted every time
    assert after[0][1] < before[0][1]  # depth 0, rank 1: tried and rejected
    assert after[1][0] < before[1][0] and after[1][1] < before[1][1]
    assert ra.trials[1, 0] == pytest.approx(20 + 50)  # node 4's parent was never accepted


def test_rank_acceptance_template_is_best_first_and_a_tree():
    ra = RankAcceptance(max_depth=4, ranks=3)
    nodes = ra.template(max_nodes=8)
    scores = [s for *_, s in nodes]
    assert scores == sorted(scores, reverse=True)
    for i, (parent, depth, rank, score) in enumerate(nodes):
        assert parent < i  # parents first
        if parent >= 0:
            assert depth == nodes[parent][1] + 1 and score <= nodes[parent][3]
        if rank > 0:  # the sibling ranked just above is in the tree, under the same parent
            assert any(p == parent and r == rank - 1 for p, _, r, _ in nodes[:i])


def _trie():
    # two paths sharing a first token: shares 1.0 at the root child, 0.75 / 0.25 below
    tree, weights = DraftTree.weighted_trie([[5, 6, 7], [5, 8]], [3.0, 1.0], 8)
    return tree, [w / 4.0 for w in weights]


def test_trie_sizer_cuts_to_what_pays_and_learns():
    tree, shares = _trie()
    flat = TrieSizer(FLAT)
    kept = flat.cut(tree, shares, key=3)
    assert len(kept) == len(tree) and flat.scores == sorted(flat.scores, reverse=True)
    steep = TrieSizer(STEEP)
    assert len(steep.cut(tree, shares, key=3)) == 0 and not steep.may_pay(3)
    # a kind of match that is drafted and never accepted stops being drafted at all
    mild = TrieSizer(MILD)
    for _ in range(40):
        kept = mild.cut(tree, shares, key=2)
        mild.observe([])
    assert len(kept) == 0 and not mild.may_pay(2) and mild.may_pay(3)


def test_trie_sizer_explores_a_worthless_kind_now_and_then():
    tree, shares = _trie()
    sizer = TrieSizer(MILD)
    for _ in range(40):
        sizer.cut(tree, shares, key=2)
        sizer.observe([])
    sizes = [len(sizer.cut(tree, shares, key=2)) for _ in range(TrieSizer.EXPLORE_EVERY)]
    assert sizes.count(1) == 1 and sizes.count(0) == TrieSizer.EXPLORE_EVERY - 1
    sizer.cut(tree, shares, key=2, explore=True)
    assert sizer.scores == [math.inf]  # a merge must verify a node drafted to learn again


def test_trie_sizer_learns_per_depth_or_per_kind():
    tree, shares = _trie()
    # the first token always accepted, the deeper ones never: per depth, the sizer learns
    # to draft the first node alone; per kind (REST's), one factor for all depths, which
    # keeps the whole trie paying on this mild curve
    deep, flat = TrieSizer(MILD), TrieSizer(MILD, by_depth=False)
    sizes: dict[bool, list[int]] = {True: [], False: []}
    for sizer in (deep, flat):
        for _ in range(30):
            kept = sizer.cut(tree, shares, key=4)
            sizes[sizer.by_depth].append(len(kept))
            sizer.observe([0] if len(kept) else [])
    assert sizes[True][0] == 3 and sizes[True][-10:] == [1] * 10
    assert sizes[False] == [3] * 30
    assert deep.calibration.factor((4, 0)) == 1.0 > 0.5 > deep.calibration.factor((4, 1))
    assert flat.calibration.factor(4) == pytest.approx(13 / 30, abs=0.01)
    assert flat.calibration.factor((4, 0)) == 1.0  # nothing learnt under depth keys


def test_trie_sizer_keep_only_restricts_what_is_learnt():
    tree, shares = _trie()
    sizer = TrieSizer(FLAT)
    sizer.cut(tree, shares, key=1)
    sizer.keep_only([0])  # a merge verified only the first node
    assert len(sizer.scores) == 1
    sizer.observe([])  # and rejected it
    assert sizer.calibration.factor((1, 0)) < 1.0
    assert sizer.calibration.factor((1, 1)) == 1.0  # the deeper nodes were not verified
    sizer.forget()
    sizer.observe([0])  # nothing drafted through the sizer this step: nothing learnt
    assert sizer.scores == [] and sizer.expected == 0.0
