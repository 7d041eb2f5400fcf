"""The llama.cpp target (``--backend llamacpp``) on a tiny GGUF written by `fixtures`.

On llama.cpp's own numerics: a tree pass gives each node the logits of its root-to-node
path run as a chain (to llama.cpp's batch noise), ``keep`` commits exactly the accepted
path, and lossless methods give ar's tokens.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import tiny_hf_model, write_gguf
from random_models import path_to, tree_mask_and_depths

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (./install.sh --llamacpp adds it)"
)

from specdec.errors import InvalidRequestError  # noqa: E402
from specdec.models.llamacpp_target import LlamaCppTarget  # noqa: E402

PROMPT = [5, 17, 33, 2, 40, 41, 9]
# root r=0; a=1, b=2 children of r; c=3 child of a; d=4 child of b; e=5 child of d
TREE = [70, 71, 72, 73, 74, 75]
PARENT = [-1, 0, 0, 1, 2, 4]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    return write_gguf(tiny_hf_model("qwen2", seed=5), root / "tiny.gguf", "qwen2", "Q8_0")


@pytest.fixture(scope="module")
def target(gguf):
    return LlamaCppTarget(gguf, n_ctx=256, threads=1)


def chain_logits(target, tokens: list[int]) -> torch.Tensor:
    target.reset()
    target.forward(PROMPT)
    return target.forward(tokens)


def test_a_tree_pass_gives_each_node_its_paths_logits(target):
    mask, depth = tree_mask_and_depths(PARENT)
    target.reset()
    target.forward(PROMPT)
    start = target.length
    tree = target.forward(TREE, positions=[start + d for d in depth], attn_mask=mask)
    assert tree.shape == (len(TREE), target.config.vocab_size)
    for leaf in (3, 5):
        path = path_to(PARENT, leaf)
        chain = chain_logits(target, [TREE[i] for i in path])
        scale = chain.abs().max()
        for row, node in enumerate(path):
            torch.testing.assert_close(tree[node], chain[row], atol=1e-3 * scale, rtol=0)


def test_keep_commits_the_accepted_path(target):
    mask, depth = tree_mask_and_depths(PARENT)
    target.reset()
    target.forward(PROMPT)
    start = target.length
    target.forward(TREE, positions=[start + d for d in depth], attn_mask=mask)
    target.keep([0, 2, 4])  # r, b, d
    assert target.length == start + 3
    after = target.forward([90])
    chain = chain_logits(target, [TREE[0], TREE[2], TREE[4], 90])[-1:]
    torch.testing.assert_close(after, chain, atol=1e-3 * chain.abs().max(), rtol=0)
    target.rollback(2)
    assert target.length == start + 2
    again = target.forward([TREE[4], 90], logits_rows=[1])
    torch.testing.assert_close(again, chain, atol=1e-3 * chain.abs().max(), rtol=0)


def test_hidden_states_and_deep_masks_are_refused(target):
    target.reset()
    with pytest.raises(InvalidRequestError, match="hidden states"):
        target.forward(PROMPT, return_hidden=True)
    target.forward(PROMPT)
    with pytest.raises(InvalidRequestError, match="new tokens only"):
        target.forward([1, 2], attn_mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("method", ["pld", "recycle", "pld+recycle"])
def test_lossless_methods_give_ar_tokens(gguf, method, monkeypatch, tmp_path):
    from specdec.api import Generator

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    gen = Generator.load(str(gguf), backend="llamacpp", progress=False)
    prompt = "the cat sat on the mat and the cat sat on the mat and the cat"
    ref = gen.generate(prompt, max_new_tokens=24, method="ar", raw=True)
    out = gen.generate(prompt, max_new_tokens=24, method=method, raw=True)
    if out.token_ids != ref.token_ids:  # llama.cpp's batch size moves logits: a near-tie
        k = next(
            i for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids, strict=False)) if a != b
        )
        gen.target.reset()
        logits = gen.target.forward(gen.prompt_ids(prompt, raw=True) + ref.token_ids[:k])[-1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] < 1e-3 * logits.abs().max()
