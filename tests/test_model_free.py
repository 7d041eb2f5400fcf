"""Model-free drafters: prompt lookup, Token Recycling, and trees merged from several drafters.

Their greedy exactness is in the conformance suite (test_contract.py) and their
sampling exactness in test_sampling_exactness.py; here: what they propose.
"""

import numpy as np
import pytest
import torch

from specdec.errors import InvalidRequestError
from specdec.models.pass_cost import PassCost
from specdec.speculation.drafters.base import Drafter, DraftState
from specdec.speculation.drafters.merged import MergedDrafter
from specdec.speculation.drafters.prompt_lookup import PromptLookupDrafter
from specdec.speculation.drafters.token_recycling import TokenRecyclingDrafter
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome


def state(tokens, budget=100):
    return DraftState(list(tokens), len(tokens), SamplingParams(), None, budget)


def paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Root-to-leaf token sequences of a tree."""
    kids = tree.children()
    return {tuple(tree.tokens[i] for i in tree.path_to(n)) for n in range(len(tree)) if not kids[n]}


def test_trie_from_paths_merges_prefixes_and_keeps_the_heaviest_prefix_closed_nodes():
    tree = DraftTree.weighted_trie([[1, 2, 3], [1, 2, 4], [5, 6]], [1.0, 1.0, 1.5], 10)[0]
    assert paths(tree) == {(1, 2, 3), (1, 2, 4), (5, 6)}
    assert len(tree) == 6  # 1 and 2 shared
    pruned = DraftTree.weighted_trie([[1, 2, 3], [1, 2, 4], [5, 6]], [1.0, 1.0, 1.5], 3)[0]
    # weights: 1:2, 2:2, 5:1.5, 6:1.5, 3:1, 4:1 -> the three heaviest
    assert paths(pruned) == {(1, 2), (5,)}
    for i, p in enumerate(pruned.parents):
        assert p < i


def test_prompt_lookup_copies_what_followed_the_last_ngram():
    d = PromptLookupDrafter(num_draft_tokens=3, min_ngram=1, max_ngram=2, branches=1)
    d.reset([])
    tree = d.propose(state([7, 8, 9, 10, 11, 5, 7, 8]))
    assert tree.tokens == [9, 10, 11] and tree.is_chain()
    # the longest n-gram wins over a more recent shorter match
    d.reset([])
    tree = d.propose(state([1, 2, 3, 9, 2, 4, 1, 2]))
    assert tree.tokens == [3, 9, 2]


def test_prompt_lookup_merges_matches_into_a_tree_and_indexes_incrementally():
    d = PromptLookupDrafter(num_draft_tokens=2, min_ngram=1, max_ngram=1, branches=3)
    seq = [4, 1, 2, 4, 3, 5, 4]
    d.reset([])
    assert paths(d.propose(state(seq))) == {(3, 5), (1, 2)}  # after "4": "3 5", "1 2"
    seq += [1, 6, 4]
    # the same drafter, three tokens later: the new occurrence "4 1 6" is indexed too
    tree = d.propose(state(seq))
    assert paths(tree) == {(1, 6), (3, 5), (1, 2)} and len(tree) == 5  # "1" shared
    d.reset([])
    assert d.propose(state([1, 2, 3])).tokens == []  # nothing matches


def test_prompt_lookup_sizes_its_tree_by_the_pass_cost_and_learns_what_a_match_is_worth():
    # "1 2 3" was followed twice by "4 5 6 ..." and once by "40 41 42 ...": shares 2/3, 1/3
    seq = [1, 2, 3, 4, 5, 6] * 2 + [1, 2, 3, 40, 41, 42, 1, 2, 3]
    flat = PromptLookupDrafter(num_draft_tokens=6, pass_cost=PassCost({1: 1.0, 64: 1.0}))
    assert len(flat.propose(state(seq))) == 12  # a flat cost: every node pays

    def steep() -> PromptLookupDrafter:  # each added token costs half a one-token pass
        return PromptLookupDrafter(num_draft_tokens=6, pass_cost=PassCost({1: 1.0, 64: 32.5}))

    tree = steep().propose(state(seq))
    assert tree.tokens == [4, 5, 6, 1, 2, 3] and tree.is_chain()  # only the 2/3 branch pays
    d = steep()
    for _ in range(24):  # the target never follows these matches
        tree = d.propose(state(seq))
        d.observe(state(seq), tree, Outcome([], 0))
    sizes = [len(d.propose(state(seq))) for _ in range(32)]
    assert sizes.count(0) >= 30 and sizes.count(1) >= 1  # cut, but still tried now and then
    d = steep()
    for _ in range(24):  # the target follows the likelier match three tokens deep every time
        tree = d.propose(state(seq))
        d.observe(state(seq), tree, Outcome([0, 1, 2], 0))
    assert d.propose(state(seq)).tokens == [4, 5, 6]


def test_prompt_lookup_respects_budget_and_node_limit():
    d = PromptLookupDrafter(num_draft_tokens=8, max_nodes=5)
    d.reset([])
    seq = list(range(20)) + [3]
    assert d.propose(state(seq, budget=2)).tokens == [4, 5]
    assert len(d.propose(state(seq))) == 5
    with pytest.raises(InvalidRequestError):
        PromptLookupDrafter(min_ngram=3, max_ngram=2)


def recycled(vocab=10, **kw) -> TokenRecyclingDrafter:
    d = TokenRecyclingDrafter(vocab, **kw)
    d.reset([])
    return d


def logits_ranking(rows: list[list[int]], vocab: int) -> torch.Tensor:
    """Logit rows whose top tokens are ``rows[i]``, best first."""
    out = torch.zeros(len(rows), vocab)
    for i, ranked in enumerate(rows):
        for r, t in enumerate(ranked):
            out[i, t] = 10.0 - r
    return out


def test_token_recycling_learns_candidates_from_the_targets_logits_and_drafts_them():
    d = recycled(top_k=2, max_nodes=10, max_depth=3)
    assert len(d.propose(state([1]))) == 0  # nothing recycled yet
    # a pass over [root 1] + tree [2]: the target ranked 2,3 after 1 and 4,5 after 2
    tree = DraftTree.chain([2])
    d._ranks = [0]
    d.observe(state([1]), tree, Outcome([0], 4, logits_ranking([[2, 3], [4, 5]], 10)))
    assert d.matrix[1].tolist() == [2, 3] and d.matrix[2].tolist() == [4, 5]
    assert (d.matrix[0] == -1).all()
    tree = d.propose(state([1]))
    # from 1: children 2 (rank 0) and 3 (rank 1); from 2: 4 and 5; 3, 4, 5 have no row yet
    assert paths(tree) == {(2, 4), (2, 5), (3,)}
    assert tree.tokens[0] == 2  # best first


def test_token_recycling_counts_acceptance_per_depth_and_rank():
    d = recycled(top_k=2, max_nodes=10, max_depth=3)
    d.matrix[1] = torch.tensor([2, 3], dtype=torch.int32)
    d.matrix[2] = torch.tensor([4, 5], dtype=torch.int32)
    acc = d.acceptance
    before = (acc.hits / acc.trials).clone()
    for _ in range(50):
        tree = d.propose(state([1]))
        # the target always continues 1 -> 3 (rank 1): rank 0 at depth 0 keeps failing
        path = [tree.tokens.index(3)]
        d.observe(state([1]), tree, Outcome(path, 9))
    after = acc.hits / acc.trials
    assert after[0, 1] > before[0, 1] and after[0, 0] < before[0, 0]
    assert d.propose(state([1])).tokens[0] == 3  # now the better guess comes first


def test_token_recycling_sizes_its_tree_by_the_pass_cost():
    def full(cost):
        d = recycled(vocab=50, top_k=4, max_nodes=40, pass_cost=cost)
        d.matrix[:] = torch.arange(50).remainder(50).view(-1, 1).repeat(1, 4)  # any tokens
        d.matrix[:, 1:] = (d.matrix[:, 1:] + torch.tensor([1, 2, 3])).remainder(50)
        return len(d.propose(state([0])))

    assert full(PassCost({1: 1.0, 64: 1.0})) == 40  # flat cost: everything pays
    assert full(PassCost({1: 1.0, 64: 64.0})) < 5  # linear cost: only the likeliest nodes
    assert full(None) == 40


def test_token_recycling_matrix_fits_in_8_mb_and_round_trips(tmp_path):
    d = TokenRecyclingDrafter(151_936)
    assert d.nbytes < 8 * 2**20
    d.matrix[5] = torch.arange(8, dtype=torch.int32)
    f = tmp_path / "m.safetensors"
    d.save(str(f))
    e = TokenRecyclingDrafter(151_936, matrix_file=str(f))
    assert torch.equal(e.matrix, d.matrix)
    with pytest.raises(InvalidRequestError, match="no Token Recycling matrix"):
        TokenRecyclingDrafter(1000, matrix_file=str(f))
    (tmp_path / "junk").write_text("not safetensors")
    with pytest.raises(InvalidRequestError, match="no Token Recycling matrix"):
        TokenRecyclingDrafter(1000, matrix_file=str(tmp_path / "junk"))
    # with a matrix file, what one request learnt is saved before the next one starts
    g = tmp_path / "g.safetensors"
    warm = TokenRecyclingDrafter(16, top_k=2, matrix_file=str(g))
    warm.reset([])
    warm.observe(state([1]), DraftTree(), Outcome([], 3, logits_ranking([[3, 4]], 16)))
    assert not g.exists()
    warm.reset([])
    assert TokenRecyclingDrafter(16, top_k=2, matrix_file=str(g)).matrix[1].tolist() == [3, 4]


def test_token_recycling_learns_the_prompts_tokens_from_the_prefill():
    from random_models import CharTokenizer, random_transformer

    from specdec.engine import Engine
    from specdec.models.target import NativeTarget

    d = recycled(vocab=48, top_k=3, prompt_rows=2)
    d.matrix[7] = torch.tensor([1, 2, 3], dtype=torch.int32)  # known: not asked again
    prompt = [5, 7, 9, 5, 9, 11, 5, 4]
    # unknown tokens by count in the prompt (5 three times, 9 twice), each at its last place
    assert d.prompt_rows(prompt) == [6, 4]
    assert recycled(vocab=48, prompt_rows=0).prompt_rows(prompt) == []

    model = random_transformer("qwen2", seed=3, vocab=48)
    list(
        Engine(NativeTarget(model, capacity=8), CharTokenizer(vocab=48)).stream(
            prompt, max_new_tokens=1, drafter=d
        )
    )  # one token: only the prefill ran
    target = NativeTarget(model, capacity=8)
    logits = target.forward(prompt)  # every row, for reference
    for pos in (6, 4, 7):  # the rows asked for and the last one, which comes free
        want = torch.topk(logits[pos], 3).indices.tolist()
        assert d.matrix[prompt[pos]].tolist() == want
    assert d.matrix[7].tolist() == [1, 2, 3] and (d.matrix[11] == -1).all()


class Fixed(Drafter):
    """Proposes a given tree; remembers what it observed."""

    def __init__(self, tree, name="fixed"):
        self.tree, self.name, self.seen = tree, name, []

    def propose(self, state):
        return DraftTree(list(self.tree.tokens), list(self.tree.parents), list(self.tree.q))

    def observe(self, state, tree, outcome):
        self.seen.append(outcome)


def test_merged_tree_shares_equal_deterministic_nodes_and_keeps_sampled_ones():
    q = torch.tensor([0.5, 0.5])
    a = Fixed(DraftTree([1, 2, 3], [-1, 0, -1]))
    b = Fixed(DraftTree([1, 4, 3], [-1, 0, -1], [None, None, q]))
    m = MergedDrafter([a, b])
    tree = m.propose(state([0]))
    assert tree.tokens == [1, 2, 3, 4, 3] and tree.parents == [-1, 0, -1, 0, -1]
    assert tree.q[4] is q  # a sampled duplicate stays a sibling of its own
    # the target accepts 1 then 4, then says 7: a sees [1] then 4; b sees [1, 4] then 7
    logits = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)
    m.observe(state([0]), tree, Outcome([0, 3], 7, logits))
    (oa,), (ob,) = a.seen, b.seen
    assert (oa.path, oa.bonus) == ([0], 4)
    assert (ob.path, ob.bonus) == ([0, 1], 7)
    assert torch.equal(ob.logits, logits[[0, 1, 4, 5]])  # rows of b's nodes: 1, 4, 3


class Scored(Fixed):
    """A `Fixed` that knows its nodes' chances and keeps what the merge tells it to."""

    def __init__(self, tree, scores, name="scored"):
        super().__init__(tree, name)
        self.scores, self.kept = scores, []

    def node_scores(self):
        return list(self.scores)

    def keep_only(self, nodes):
        self.kept.append(nodes)


def test_merged_tree_is_cut_jointly_to_what_pays_and_parts_learn_only_from_what_was_kept():
    # a: 1 -> 2 (chances 0.9, 0.5) and 3 (0.05); b: 1 -> 5 (0.9, 0.3) and 6 (0.01)
    a = Scored(DraftTree([1, 2, 3], [-1, 0, -1]), [0.9, 0.5, 0.05])
    b = Scored(DraftTree([1, 5, 6], [-1, 0, -1]), [0.9, 0.3, 0.01])
    flat = MergedDrafter([a, b], pass_cost=PassCost({1: 1.0, 64: 1.0}))
    assert len(flat.propose(state([0]))) == 5  # free nodes: the whole union
    assert a.kept == [] and b.kept == []

    steep = MergedDrafter([a, b], pass_cost=PassCost({1: 1.0, 64: 7.3}))  # +0.1 a node
    tree = steep.propose(state([0]))
    # worth its 0.1: the shared 1 (0.9), 2 (0.5), 5 (0.3); not 3 (0.05) or 6 (0.01)
    assert tree.tokens == [1, 2, 5] and tree.parents == [-1, 0, 0]
    assert a.kept == [[0, 1]] and b.kept == [[0, 1]]
    # the target takes 1 then 5, then says 8: each part sees its kept subtree's indices
    logits = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)
    steep.observe(state([0]), tree, Outcome([0, 2], 8, logits))
    (oa,), (ob,) = a.seen, b.seen
    assert (oa.path, oa.bonus) == ([0], 5) and (ob.path, ob.bonus) == ([0, 1], 8)
    assert torch.equal(ob.logits, logits[[0, 1, 3]])

    # a part without scores keeps its whole tree; the scored part's nodes are cut beside it
    c = Fixed(DraftTree([7, 3], [-1, -1]))
    a.kept = []
    mixed = MergedDrafter([a, c], pass_cost=PassCost({1: 1.0, 64: 7.3}))
    tree = mixed.propose(state([0]))
    # c's 3 is a's 3 too: kept, since c has no scores; a's 2 still pays, its 1 too
    assert sorted(tree.tokens) == [1, 2, 3, 7] and a.kept == []


def test_sized_drafters_give_node_scores_and_keep_only_what_they_are_told():
    cost = PassCost({1: 1.0, 64: 1.0})
    d = PromptLookupDrafter(num_draft_tokens=3, pass_cost=cost)
    seq = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2]
    tree = d.propose(state(seq))
    scores = d.node_scores()
    assert len(scores) == len(tree) > 2
    assert all(scores[c] <= scores[p] for c, p in enumerate(tree.parents) if p >= 0)
    keep = [0, 1]
    d.keep_only(keep)
    assert d.node_scores() == [scores[0], scores[1]]
    d.observe(state(seq), tree.subtree(keep), Outcome([0, 1], 9))  # no error: 2 nodes known
    r = TokenRecyclingDrafter(16, top_k=2, max_nodes=6, pass_cost=cost)
    r.matrix[2] = torch.tensor([3, 4], dtype=torch.int32)
    r.matrix[3] = torch.tensor([5, 6], dtype=torch.int32)
    tree = r.propose(state([1, 2]))
    assert len(r.node_scores()) == len(tree) == 4  # 2 -> 3, 4; 3 -> 5, 6
    r.keep_only([0, 1])
    r.observe(state([1, 2]), tree.subtree([0, 1]), Outcome([0], 4))
    assert r.acceptance.trials.sum() > 0


def test_merged_methods_from_the_table():
    from specdec.speculation.drafters.base import BuildContext

    method = get_method("pld+recycle")
    assert method.lossless and "max_nodes" in method.option_names()
    ctx = BuildContext(tokenizer=None, vocab_size=32)  # no pass-cost curve here
    drafter = method.build(ctx, {"max_nodes": 5, "size_by_cost": False})
    assert isinstance(drafter, MergedDrafter) and drafter.name == "pld+recycle"
    assert [d.max_nodes for d in drafter.drafters] == [5, 5]
    # what each part runs with, its own defaults for what was not given (bench reports it)
    opts = method.effective_options({"max_nodes": 5})
    assert opts["pld"]["max_nodes"] == opts["recycle"]["max_nodes"] == 5
    assert opts["pld"]["branches"] == 3 and opts["recycle"]["top_k"] == 8
    assert opts["merge"] == {"joint": True} and drafter.pass_cost is None

    measured = BuildContext(
        tokenizer=None, vocab_size=32, pass_cost=lambda: PassCost({1: 1.0, 64: 8.0})
    )
    joint = method.build(measured, {})
    assert joint.pass_cost is not None and all(d.name for d in joint.drafters)
    assert method.build(measured, {"joint": False}).pass_cost is None
    assert method.build(measured, {"size_by_cost": False}).pass_cost is None
    assert get_method("pld").effective_options({})["max_nodes"] == 16
    for bad in ["ar+pld", "pld+nope", "pld+"]:
        with pytest.raises(InvalidRequestError):
            get_method(bad)


class WordTokenizer:
    """A stand-in tokenizer for datastores: one id per character of 'abcdefgh '."""

    chars = "abcdefgh "

    def vocab(self):
        return {c: i for i, c in enumerate(self.chars)}

    def encode_many(self, texts):
        return [[self.chars.index(c) for c in t if c in self.chars] for t in texts]


def test_suffix_array_sorts_positions_by_their_first_16_tokens():
    from specdec.speculation import datastore as ds

    rng = np.random.default_rng(0)
    tokens = rng.integers(-1, 4, size=500).astype(np.int32)
    sa = ds.suffix_array(tokens)
    padded = list(tokens) + [-1] * ds.SPAN
    keys = [tuple(padded[p : p + ds.SPAN]) for p in sa]
    assert keys == sorted(keys) and sorted(sa.tolist()) == list(range(500))


def test_datastore_build_lookup_and_continuations(tmp_path):
    from specdec.speculation import datastore as ds

    for i, text in enumerate(["abc abd abc", "hab abc", "xyz"]):
        (tmp_path / "in" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_text(text)
    tok = WordTokenizer()
    files = ds.input_files([str(tmp_path / "in")])
    meta = ds.build(tok, files, tmp_path / "store", progress=False)
    assert meta["documents"] == 3 and meta["tokens"] == 11 + 1 + 7 + 1 + 0 + 1
    store = ds.Datastore(tmp_path / "store", tok)
    a, b, c, d, sp = (tok.chars.index(x) for x in "abcd ")
    starts = store.lookup([a, b])
    assert len(starts) == 5  # "ab" three times in the first document, twice in the second
    conts = store.continuations(starts, 3)
    # no continuation runs past the end of its document
    assert sorted(conts) == sorted([(c, sp, a), (d, sp, a), (c,), (sp, a, b), (c,)])
    assert len(store.lookup([d, d])) == 0
    with pytest.raises(InvalidRequestError, match="another tokenizer"):

        class Other(WordTokenizer):
            chars = "hgfedcba "

        ds.Datastore(tmp_path / "store", Other())
    with pytest.raises(InvalidRequestError, match="no datastore"):
        ds.Datastore(tmp_path / "nothing", tok)
    with pytest.raises(InvalidRequestError, match="no such file"):
        ds.input_files([str(tmp_path / "missing.txt")])
    # a rebuild replaces a datastore; any other existing folder is refused, left untouched
    assert ds.build(tok, files, tmp_path / "store", progress=False)["tokens"] == 21
    with pytest.raises(InvalidRequestError, match="is not a datastore"):
        ds.build(tok, files, tmp_path / "in", progress=False)
    assert len(list((tmp_path / "in").iterdir())) == 3
    (tmp_path / "empty").mkdir()  # an empty folder (e.g. from mkdtemp) is taken
    assert ds.build(tok, files, tmp_path / "empty", progress=False)["tokens"] == 21


def test_rest_drafts_the_longest_matching_suffixes_continuations_by_frequency(tmp_path):
    from specdec.speculation import datastore as ds
    from specdec.speculation.drafters.retrieval import RetrievalDrafter

    docs = [[1, 2, 3, 4, 5]] * 3 + [[1, 2, 3, 6]] + [[9, 2, 3, 7, 7]] * 5
    ds.write(docs, tmp_path / "s", "fp")
    store = ds.Datastore(tmp_path / "s")
    d = RetrievalDrafter(store, max_nodes=10, continuation=3)
    # the context ends "1 2 3": the 3-token span matches 4 times (not "9 2 3", a shorter span)
    tree = d.propose(state([8, 1, 2, 3]))
    assert paths(tree) == {(4, 5), (6,)}
    assert tree.tokens[0] == 4  # 3 of 4 continuations: the heaviest first
    tree = d.propose(state([5, 2, 3]))  # only "2 3" matches: all nine
    assert paths(tree) == {(4, 5), (6,), (7, 7)}
    assert d.propose(state([0, 0])).tokens == []
    assert len(RetrievalDrafter(store, max_nodes=2).propose(state([2, 3]))) == 2


def test_rest_bisection_finds_the_same_longest_span_as_a_longest_first_scan(tmp_path):
    from specdec.speculation import datastore as ds
    from specdec.speculation.drafters.retrieval import RetrievalDrafter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 4, size=int(rng.integers(5, 40))).tolist() for _ in range(30)]
    ds.write(docs, tmp_path / "s", "fp")
    store = ds.Datastore(tmp_path / "s")
    d = RetrievalDrafter(store, min_span=2, max_span=12)
    found = 0
    for _ in range(300):
        tokens = rng.integers(0, 5, size=int(rng.integers(1, 16))).tolist()  # 4: unseen
        scan = next(
            (
                (n, store.lookup(tokens[-n:]))
                for n in range(min(12, len(tokens)), 1, -1)
                if len(store.lookup(tokens[-n:]))
            ),
            None,
        )
        got = d._longest_match(tokens)
        assert (got is None) == (scan is None)
        if scan is not None:
            found += 1
            assert got[0] == scan[0] and got[1].tolist() == scan[1].tolist()
    assert found > 100


def test_rest_sizes_its_tree_by_the_pass_cost_and_learns_what_a_match_is_worth(tmp_path):
    from specdec.speculation import datastore as ds
    from specdec.speculation.drafters.retrieval import RetrievalDrafter

    docs = [[1, 2, 3, 4, 5, 6, 7]] * 3 + [[1, 2, 3, 8, 9]]
    ds.write(docs, tmp_path / "s", "fp")
    store = ds.Datastore(tmp_path / "s")
    assert (
        len(RetrievalDrafter(store, pass_cost=PassCost({1: 1.0, 64: 1.0})).propose(state([2, 3])))
        == 6
    )  # a flat cost: the whole trie pays
    d = RetrievalDrafter(store, pass_cost=PassCost({1: 1.0, 2: 1.5, 64: 32.5}))
    full = d.propose(state([2, 3]))
    assert 0 < len(full) < 6  # a steep cost: only the heaviest nodes (3 of 4 matches)
    assert full.tokens[0] == 4
    for _ in range(20):  # the target never follows what is retrieved after "2 3"
        tree = d.propose(state([2, 3]))
        d.observe(state([2, 3]), tree, Outcome([], 0))
    sizes = [len(d.propose(state([2, 3]))) for _ in range(32)]
    assert sizes.count(0) >= 30  # no longer worth a pass over more tokens ...
    assert sizes.count(1) >= 1  # ... but still tried now and then, to learn if that changes
    assert len(d.propose(state([1, 2, 3]))) > 0  # a longer match is judged on its own


def test_ngram_cache_learns_across_requests_and_drafts_confident_continuations():
    from specdec.speculation.drafters.ngram_cache import NgramCacheDrafter

    d = NgramCacheDrafter(num_draft_tokens=4, min_ngram=1, max_ngram=2, branches=2)
    d.reset([1, 2, 3, 4])
    assert d.propose(state([1, 2, 3, 4])).tokens == []  # "4" never seen followed by anything
    d.reset([9])  # a new request: the counts of the first one stay
    tree = d.propose(state([9, 2]))
    # after "2": 3 (seen once); then after "2 3": 4 -> the chain 3 4
    assert paths(tree) == {(3, 4)}
    d.reset([2, 5, 2])
    tree = d.propose(state([2, 5, 2]))  # now "2" was followed by 3 and by 5
    assert {p[0] for p in paths(tree)} == {3, 5}
    with pytest.raises(InvalidRequestError):
        NgramCacheDrafter(min_ngram=2, max_ngram=1)
    capped = NgramCacheDrafter(max_entries=3)
    capped.reset([])
    capped.propose(state(list(range(50))))
    assert len(capped.next) == 3


def test_ngram_cache_sizes_its_tree_by_the_pass_cost():
    from specdec.speculation.drafters.ngram_cache import NgramCacheDrafter

    seq = [1, 2, 3, 4, 5] * 3 + [1]
    flat = NgramCacheDrafter(num_draft_tokens=4, pass_cost=PassCost({1: 1.0, 64: 1.0}))
    assert flat.propose(state(seq)).tokens == [2, 3, 4, 5]  # every node pays
    d = NgramCacheDrafter(num_draft_tokens=4, pass_cost=PassCost({1: 1.0, 64: 32.5}))
    for _ in range(24):  # the target takes the first two tokens every time
        tree = d.propose(state(seq))
        d.observe(state(seq), tree, Outcome([0, 1][: len(tree)], 0))
    assert d.propose(state(seq)).tokens == [2, 3]
    for _ in range(40):  # then none
        tree = d.propose(state(seq))
        d.observe(state(seq), tree, Outcome([], 0))
    sizes = [len(d.propose(state(seq))) for _ in range(32)]
    assert sizes.count(0) >= 30 and sizes.count(1) >= 1


def test_lookahead_runs_its_window_as_a_tree_and_pools_the_columns():
    from specdec.speculation.drafters.lookahead import LookaheadDrafter

    d = LookaheadDrafter(window=3, ngram=3, guesses=2, pool_from_prompt=False)
    d.reset([])
    d.levels = [[10, 11], [20, 21, 22]]  # level 0: W - 1 tokens; level 1: W
    tree = d.propose(state([5]))
    # no guesses yet: the trunk 10 -> 11 after the root, then column j's level-1 token
    # hangs from the root (j = 0), from 10 (j = 1) and from 11 (j = 2)
    assert tree.tokens == [10, 11, 20, 21, 22]
    assert tree.parents == [-1, 0, -1, 0, 1]
    assert tree.depths == [0, 1, 0, 1, 2]  # positions p + 1 + depth: p+1, p+2, p+1, ...
    logits = torch.zeros(6, 40)
    for node, best in [(2, 30), (3, 31), (4, 32)]:  # after each level-1 token
        logits[node + 1, best] = 1.0
    d.observe(state([5]), tree, Outcome([], 7, logits))
    assert d.levels == [[21, 22], [30, 31, 32]]  # slid one level; the new one from the target
    # one n-gram per column: (level-0 token or root) -> (level-1 token, new token)
    assert list(d.pool[5]) == [(20, 30)]
    assert list(d.pool[10]) == [(21, 31)] and list(d.pool[11]) == [(22, 32)]
    tree = d.propose(state([5, 7, 10]))  # the last token is 10: its n-gram is a guess
    assert tree.tokens[:2] == [21, 31] and tree.parents[:2] == [-1, 0]
    assert len(tree) == 2 + 5


def test_lookahead_pool_keeps_the_most_recent_guesses_and_fits_the_budget():
    from specdec.speculation.drafters.lookahead import LookaheadDrafter

    d = LookaheadDrafter(window=2, ngram=3, guesses=2)
    d.reset([])
    tree = d.propose(state([1, 2, 3, 1, 4, 5, 1, 6, 7, 1]))  # prompt n-grams after "1"
    assert paths(tree.subtree(list(range(4)))) == {(6, 7), (4, 5)}  # two newest of three
    assert len(d.propose(state([1, 2, 3, 1, 4, 5, 1, 6, 7, 1], budget=3))) <= 3
    with pytest.raises(InvalidRequestError):
        LookaheadDrafter(ngram=2)


def test_lookahead_runs_its_window_only_while_what_it_earns_pays_for_its_nodes():
    from specdec.speculation.drafters.lookahead import LookaheadDrafter

    seq = [1, 2, 3, 1, 2, 3, 1]  # the pool (from the text) guesses (2, 3) after 1
    window_nodes = 1 + 1 * 2  # W 2, N 3
    flat = LookaheadDrafter(window=2, ngram=3, guesses=1, pass_cost=PassCost({1: 1.0, 64: 1.0}))
    assert len(flat.propose(state(seq))) == 2 + window_nodes  # free nodes: the window runs

    steep = PassCost({1: 1.0, 64: 8.0})
    d = LookaheadDrafter(window=2, ngram=3, guesses=1, pass_cost=steep)
    sizes = []
    for _ in range(32):
        tree = d.propose(state(seq))
        sizes.append(len(tree))
        right = [0, 1] if tree.tokens[:2] == [2, 3] else []  # the target goes on 2, 3
        d.observe(state(seq), tree, Outcome(right, 1, torch.zeros(len(tree) + 1, 8)))
    # half a token of worth does not pay for 3 more nodes on this curve: the guess only,
    # and the window once in EXPLORE_EVERY passes so that its worth is measured again
    assert sizes.count(2) == 30 and sizes.count(2 + window_nodes) == 2

    d = LookaheadDrafter(window=2, ngram=3, guesses=1, pass_cost=PassCost({1: 1.0, 64: 8.0}))
    d._worth_tokens, d._worth_passes = 0.0, 1.0  # the window has earned nothing
    assert len(d.propose(state(seq))) == 2
    d = LookaheadDrafter(window=2, ngram=3, guesses=1, pass_cost=PassCost({1: 1.0, 64: 8.0}))
    d.pool_from_prompt = False
    d.reset([])
    d.levels = [[10], [20, 21]]
    tree = d.propose(state([5]))  # prior worth, nothing to guess: the window runs
    assert tree.tokens == [10, 20, 21]
    logits = torch.zeros(4, 40)
    logits[2, 30] = logits[3, 31] = 1.0  # after the level-1 tokens 20 and 21
    d.observe(state([5]), tree, Outcome([], 7, logits))
    assert d.pool[5] == {(20, 30): True} and d.pool[10] == {(21, 31): True}
    before = d.window_worth
    tree = d.propose(state([5, 7, 10]))
    assert tree.tokens[:2] == [21, 31]
    d.observe(state([5, 7, 10]), tree, Outcome([0, 1], 9, torch.zeros(len(tree) + 1, 40)))
    assert d.window_worth > before  # two tokens accepted through what only the window made
    d._pool_committed([10, 21, 31])  # the text now has it too: no longer the window's alone
    assert d.pool[10] == {(21, 31): False}


def test_stand_keeps_running_means_of_the_targets_distributions():
    from specdec.speculation.drafters.stand import StandDrafter

    d = StandDrafter(10, top_k=3, min_ngram=1, max_ngram=2)
    d._record([1, 2], [5, 6, 7], [0.7, 0.2, 0.05])
    d._record([9, 2], [5, 6, 8], [0.3, 0.6, 0.05])
    one = d.memory[(2,)]  # both observations end in "2": averaged
    assert one.ids[:2] == [5, 6] and one.probs[:2] == pytest.approx([0.5, 0.4])
    assert one.count == 2 and len(one.ids) == 3  # cut back to top_k
    assert d.memory[(1, 2)].probs == [0.7, 0.2, 0.05]  # the longer n-gram saw one
    assert d._entry([4, 1, 2]) is d.memory[(1, 2)]  # longest first
    assert d._entry([4, 3, 2]) is one
    # the prefill's rows seed entries: unknown tokens, most frequent first, last place each
    prompt = [2, 4, 3, 4, 7]
    assert d.prompt_rows(prompt) == [3, 4, 2]  # 2 is known already
    d.observe_prompt(prompt, [3, 4], logits_ranking([[8, 9], [1]], 10))
    assert d.memory[(3, 4)].ids[:2] == [8, 9] and d.memory[(4,)].ids[:2] == [8, 9]
    assert d.memory[(4, 7)].ids[0] == 1
    under = StandDrafter(10, top_k=3)
    shaped = SamplingParams(temperature=1.0, top_k=2)
    under.observe(
        DraftState([4], 1, shaped, None, 9),
        DraftTree(),
        Outcome([], 8, logits_ranking([[8, 9, 1]], 10)),
    )
    assert under.memory[(4,)].ids == [8, 9]  # what top-k sampling rules out is not stored
    assert sum(under.memory[(4,)].probs) == pytest.approx(1.0)


def test_stand_drafts_ranked_children_greedily_and_samples_them_without_replacement():
    from specdec.speculation.drafters.stand import StandDrafter

    d = StandDrafter(10, top_k=3, min_ngram=1, max_ngram=1, max_nodes=6, max_depth=2)
    d._record([2], [5, 6, 7], [0.6, 0.3, 0.1])
    d._record([5], [8, 9], [0.5, 0.4])
    tree = d.propose(state([1, 2]))
    roots = [tree.tokens[i] for i, p in enumerate(tree.parents) if p == -1]
    assert roots == [5, 6, 7] and tree.q[0] is None  # greedy: the likeliest, in order
    assert (8,) in {tuple(tree.tokens[j] for j in tree.path_to(i))[1:] for i in range(len(tree))}
    sampled = DraftState([1, 2], 2, SamplingParams(temperature=1.0), torch.Generator(), 100)
    firsts = set()
    for _ in range(200):
        t = d.propose(sampled)
        kids = [i for i, p in enumerate(t.parents) if p == -1]
        toks = [t.tokens[i] for i in kids]
        assert len(set(toks)) == len(toks)  # without replacement
        q0 = t.q[kids[0]]
        assert q0 is not None and q0[[5, 6, 7]].tolist() == pytest.approx([0.6, 0.3, 0.1])
        if len(kids) > 1:  # the second sibling's q: the first one removed
            assert t.q[kids[1]][toks[0]] == 0
        firsts.add(toks[0])
    assert firsts == {5, 6, 7}
