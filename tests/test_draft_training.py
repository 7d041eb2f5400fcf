"""Draft-model training's building blocks: a trainable copy (maybe cut to its first
layers) computes what the model's cached passes do, with gradients; a saved draft loads
in specdec and in transformers to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import _rms_norm_in_input_dtype, save_hf_folder, tiny_hf_model
from random_models import full_logits, random_transformer
from test_eagle import TEXT, tiny  # noqa: F401 - the tiny model fixture, shared

from specdec.errors import InvalidRequestError
from specdec.train.draft_model import DRAFT_INFO, save_draft, sequence_logits, trainable_copy

TOKENS = [3, 9, 4, 1, 7, 7, 2, 11, 5]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_trainable_copy_computes_what_the_model_does(arch):
    model = random_transformer(arch, seed=1, vocab=24, layers=3)
    copy = trainable_copy(model, dtype=torch.float64)
    got = sequence_logits(copy, torch.tensor(TOKENS))
    assert torch.allclose(got, full_logits(model, TOKENS), atol=1e-10)
    assert torch.allclose(sequence_logits(copy, torch.tensor(TOKENS), slice(2, 5)), got[2:5])
    # cut to its first layer: the model's early exit after layer 0
    cut = trainable_copy(model, layers=1, dtype=torch.float64)
    assert cut.config.num_layers == 1 and len(cut.layers) == 1
    exit0 = model(torch.tensor(TOKENS), torch.arange(len(TOKENS)), model.new_cache(), layers=[0])
    assert torch.allclose(sequence_logits(cut, torch.tensor(TOKENS)), exit0, atol=1e-10)
    # gradients reach every weight; the model itself is untouched
    sequence_logits(cut, torch.tensor(TOKENS)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cut.parameters())
    assert all(p.grad is None for p in model.parameters())
    for bad in (0, 4):
        with pytest.raises(InvalidRequestError, match="--layers must be 1 .. 3"):
            trainable_copy(model, layers=bad)


@pytest.mark.parametrize("arch, tie", [("qwen2", True), ("llama", False)])
def test_a_saved_draft_loads_in_specdec_and_in_transformers(tmp_path, arch, tie):
    import transformers

    from specdec.models.loading import load_model

    source = save_hf_folder(tiny_hf_model(arch, seed=2, tie=tie), tmp_path / "source")
    loaded = load_model(source, dtype="float64", quant="none", progress=False)
    draft = trainable_copy(loaded.model, layers=1, dtype=torch.float64)
    with torch.no_grad():
        for p in draft.parameters():  # as if trained, and as the float32 file keeps it
            p.copy_((p + 0.01 * torch.randn_like(p)).float().double())
    out = save_draft(draft, source, tmp_path / "draft", {"loss": "tvd"})
    assert json.loads((out / DRAFT_INFO).read_text()) == {"loss": "tvd"}
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        want = sequence_logits(draft, tokens)
    back = load_model(out, dtype="float64", quant="none", progress=False)
    assert back.config.num_layers == 1 and back.tokenizer.vocab() == loaded.tokenizer.vocab()
    assert torch.allclose(full_logits(back.model, TOKENS), want, atol=1e-10)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64).eval()
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _rms_norm_in_input_dtype.__get__(module)
    with torch.no_grad():
        assert torch.allclose(hf(tokens[None]).logits[0], want, atol=1e-8)
    again = save_draft(draft, source, tmp_path / "draft", {"loss": "fkl"})  # replaced whole
    assert json.loads((again / DRAFT_INFO).read_text()) == {"loss": "fkl"}


def test_a_packed_model_is_refused_with_a_reason():
    from specdec.models.quant_linear import float_parts, quantise_linears

    model = random_transformer("qwen2", seed=1, vocab=24, dtype=torch.float32, intermediate_size=64)
    quantise_linears(model, lambda name: float_parts(model.get_submodule(name).weight, "int8"))
    with pytest.raises(InvalidRequestError, match="--quant none"):
        trainable_copy(model)


def draft_config(corpus, **kw):
    from specdec.train.draft import DraftTrainConfig

    base = dict(data=str(corpus), minutes=None, tokens=6000, feature_tokens=1200, seq_len=48,
                respond=0, rows=32, lr=3e-3, checkpoint_s=1e9, held_out=0.2)  # fmt: skip
    return DraftTrainConfig(**{**base, **kw})


def test_distillation_raises_acceptance_and_the_draft_runs_by_name(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The tiny model cut to one layer, distilled towards itself whole: held-out acceptance
    and agreement rise; the draft is found by name, drafts greedy-exactly, and is accepted."""
    from specdec.train.draft import train

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    gen, corpus, _ = tiny
    cfg = draft_config(corpus, draft=gen.name, layers=1, loss="tvd")
    report = train(gen, cfg, name="tiny-1l", work=tmp_path / "work", progress=False)
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    assert after["loss"] < before["loss"]
    assert after["acceptance"] > before["acceptance"] + 0.05
    assert after["greedy_agreement"] > before["greedy_agreement"]
    assert (tmp_path / "cache" / "drafts" / "tiny-1l" / "config.json").is_file()
    ar = gen.generate(TEXT[:40], raw=True, max_new_tokens=30, method="ar", ignore_eos=True)
    res = gen.generate(TEXT[:40], raw=True, max_new_tokens=30, method="draft",
                       draft_model="tiny-1l", ignore_eos=True)  # fmt: skip
    assert res.token_ids == ar.token_ids and res.stats.accepted > 0


def test_resumed_distillation_equals_an_uninterrupted_run(tiny, tmp_path):  # noqa: F811
    from specdec.train.draft import train

    gen, corpus, _ = tiny
    train(gen, draft_config(corpus, draft=gen.name, layers=2, tokens=1200), out=tmp_path / "a",
          work=tmp_path / "wa", progress=False)  # fmt: skip
    train(gen, draft_config(corpus, draft=gen.name, layers=2, tokens=600), out=tmp_path / "b",
          work=tmp_path / "wb", progress=False)  # fmt: skip
    train(gen, draft_config(corpus, draft=gen.name, layers=2, tokens=1200), out=tmp_path / "b",
          work=tmp_path / "wb", resume=True, progress=False)  # fmt: skip
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss", "kl"], "invalid choice: 'kl'"),
        (["--tokens", "10", "--layers", "0"], "--layers must be >= 1"),
        (["--tokens", "10", "--beta", "1"], "--beta must be in (0, 1)"),
        (["--tokens", "10", "--data", "nowhere.txt"], "neither a source"),
        (["--tokens", "10", "--draft", "smollm2-135m"], "another vocabulary"),
        (["--tokens", "10", "--name", "../x"], "a draft's name is one folder name"),
        (["--tokens", "10", "--draft", "no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_train_draft_refuses_bad_input(tiny, tmp_path, monkeypatch, capsys, args, message):  # noqa: F811
    from specdec.cli import main

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    gen, corpus, _ = tiny
    draft = [] if "--draft" in args else ["--draft", gen.name]
    try:
        code = main(["train", "draft", "--model", gen.name, "--quant", "none", "--quiet",
                     "--data", str(corpus), *draft, *args])  # fmt: skip
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "drafts").exists()


def test_on_policy_distillation_scores_the_drafts_own_answers(tiny, tmp_path):  # noqa: F811
    """DistillSpec's on-policy data: the draft answers each prompt, the target scores the
    answer; acceptance of the draft's own tokens rises; a resumed run equals an
    uninterrupted one (the answers are drawn with seeds, from the same weights)."""
    from safetensors.torch import load_file

    from specdec.train.draft import train

    gen, _, prompts = tiny
    kw = dict(data=str(prompts), respond=8, draft=gen.name, layers=1, data_from="draft",
              held_out=0.25, feature_tokens=2000)  # fmt: skip
    report = train(gen, draft_config(prompts, tokens=3000, **kw), out=tmp_path / "a",
                   work=tmp_path / "wa", progress=False)  # fmt: skip
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    assert before["positions"] > 0 and after["acceptance"] > before["acceptance"] + 0.05
    assert json.loads((tmp_path / "a" / DRAFT_INFO).read_text())["data_from"] == "draft"
    train(gen, draft_config(prompts, tokens=1500, **kw), out=tmp_path / "b", work=tmp_path / "wb",
          progress=False)  # fmt: skip
    train(gen, draft_config(prompts, tokens=3000, **kw), out=tmp_path / "b", work=tmp_path / "wb",
          resume=True, progress=False)  # fmt: skip
    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
