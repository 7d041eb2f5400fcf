"""The command line with user errors: one `specdec: error:` line on stderr, no traceback, non-zero
exit; and the happy path of `generate --json` on a tiny GGUF written by `fixtures`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from fixtures import CONTEXT, corrupt_copies, save_hf_folder, tiny_hf_model, write_gguf

from specdec.cli import main
from specdec.errors import SpecdecError
from specdec.models.catalog import KNOWN_MODELS

FAST = ["--quiet", "--max-new-tokens", "4", "--dtype", "float32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny model files shared by the module: a GGUF, its corrupt copies, a folder, a bad folder."""
    root = tmp_path_factory.mktemp("models")
    gguf = write_gguf(tiny_hf_model("qwen2", seed=0), root / "tiny-qwen2.gguf", "qwen2", "Q8_0")
    truncated, bad_magic = corrupt_copies(gguf, root / "corrupt")
    folder = save_hf_folder(tiny_hf_model("llama", seed=1), root / "tiny-llama")
    neox = root / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(
        json.dumps({"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": 4})
    )
    return {
        "gguf": gguf,
        "truncated": truncated,
        "bad_magic": bad_magic,
        "folder": folder,
        "neox": neox,
        "cache": root / "cache",
    }


@pytest.fixture(autouse=True)
def cache(files, monkeypatch):
    """A cache in a temporary folder, shared by this module so the tiny GGUF converts once."""
    monkeypatch.setenv("SPECDEC_CACHE", str(files["cache"]))
    return files["cache"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, *fragments: str) -> str:
    assert rc == SpecdecError.exit_code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("specdec: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- error cases
CASES = {
    # name: (argv builder, fragments the one error line must contain)
    "missing file": (
        lambda f: ["--model", "/nonexistent.gguf"],
        ["no such file", "/nonexistent.gguf"],
    ),
    "truncated gguf": (lambda f: ["--model", str(f["truncated"])], ["truncated", "GGUF"]),
    "bad magic": (lambda f: ["--model", str(f["bad_magic"])], ["bad magic"]),
    "unsupported architecture": (
        lambda f: ["--model", str(f["neox"])],
        ["unsupported architecture", "gpt_neox"],
    ),
    "unknown model name": (
        lambda f: ["--model", "no-such-model"],
        ["unknown model 'no-such-model'", *KNOWN_MODELS],
    ),
    "temperature": (
        lambda f: ["--model", str(f["gguf"]), "--temperature", "-1"],
        ["temperature", "-1"],
    ),
    "top-p": (lambda f: ["--model", str(f["gguf"]), "--top-p", "0"], ["top-p"]),
    "max new tokens": (
        lambda f: ["--model", str(f["gguf"]), "--max-new-tokens", "0"],
        ["max new tokens"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_error(capsys, files, case):
    build, fragments = CASES[case]
    # later options win, so a case may override --max-new-tokens
    rc, out, err = run_cli(capsys, "generate", "hello", *FAST, *build(files))
    assert_one_error_line(rc, err, *fragments)
    assert out == ""


@pytest.mark.parametrize("prompt", ["", "   ", " \n\t "])
@pytest.mark.parametrize("model", ["gguf", "folder"])
def test_empty_prompt(capsys, files, model, prompt):
    rc, out, err = run_cli(capsys, "generate", prompt, "--model", str(files[model]), *FAST)
    assert_one_error_line(rc, err, "empty prompt")
    assert out == ""


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["stream", "json"])
def test_prompt_longer_than_the_context(capsys, files, json_flag):
    prompt = "0123456789" * 40  # one token per digit: 400 tokens, context 256
    rc, out, err = run_cli(
        capsys, "generate", prompt, "--raw", "--model", str(files["gguf"]), *FAST, *json_flag
    )
    assert_one_error_line(rc, err, "400 tokens", f"context of {CONTEXT}")
    assert out == ""


def test_pull_unknown_name(capsys):
    rc, out, err = run_cli(capsys, "pull", "no-such-model", "--quiet")
    assert_one_error_line(rc, err, "unknown model 'no-such-model'")
    assert out == ""


@pytest.mark.parametrize("case", ["truncated", "empty prompt, first conversion"])
def test_errors_through_a_real_process(files, tmp_path, case):
    """`python -m specdec.cli`: the exit code and stderr a shell user sees.

    The second case converts the GGUF in a fresh cache first (transformers and all), so any
    warning a library prints on the way would show up on stderr and fail the test.
    """
    if case == "truncated":
        argv, fragment = ["hello", "--model", str(files["truncated"])], "truncated"
    else:
        argv, fragment = ["  ", "--model", str(files["gguf"])], "empty prompt"
    env = {**os.environ, "SPECDEC_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "generate", *argv, *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == SpecdecError.exit_code
    assert proc.stdout == ""
    assert_one_error_line(proc.returncode, proc.stderr, fragment)
    if case != "truncated":
        assert any((tmp_path / "cache" / "converted").iterdir())


# --------------------------------------------------------------------------- the happy path
def generate_json(capsys, files, prompt: str, *extra: str) -> dict:
    rc, out, err = run_cli(
        capsys, "generate", prompt, "--model", str(files["gguf"]), "--json", "--raw", *FAST, *extra
    )
    assert rc == 0, err
    assert err == ""  # --quiet
    lines = out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_generate_json(capsys, files):
    result = generate_json(capsys, files, "the cat sings")
    assert {"text", "token_ids", "stats"} <= result.keys()
    stats = result["stats"]
    assert {"new_tokens", "target_passes", "wall_s", "prefill_s", "tokens_per_s"} <= stats.keys()
    ids = result["token_ids"]
    assert 1 <= len(ids) <= 4 and all(isinstance(i, int) and 0 <= i < 96 for i in ids)
    assert stats["new_tokens"] == len(ids)
    assert stats["target_passes"] == len(ids)  # autoregressive: one pass per token
    assert 0 <= stats["prefill_s"] <= stats["wall_s"]
    assert stats["tokens_per_s"] > 0
    assert stats["weight_bytes_per_step"] > 0 and stats["floor_ms"] > 0
    assert isinstance(result["text"], str)
    # greedy decoding is deterministic
    assert generate_json(capsys, files, "the cat sings")["token_ids"] == ids


def test_generate_reads_stdin(capsys, files, monkeypatch):
    expected = generate_json(capsys, files, "the cat sings")
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat sings"))
    got = generate_json(capsys, files, "-")
    assert got["token_ids"] == expected["token_ids"]
    assert got["text"] == expected["text"]


def test_generate_stream_from_folder(capsys, files):
    rc, out, err = run_cli(
        capsys, "generate", "hello there", "--model", str(files["folder"]), *FAST
    )
    assert rc == 0, err
    assert err == ""
    assert out.endswith("\n")


METHOD_CASES = {
    "unknown method": (["--method", "nope"], ["unknown method 'nope'"]),
    "option not of the method": (
        ["--method", "ar", "--num-draft-tokens", "3"],
        ["method 'ar' takes no option 'num_draft_tokens'"],
    ),
    "draft without a draft model": (["--method", "draft"], ["needs a draft model"]),
    "bad option value": (
        ["--method", "draft", "--option", "num_draft_tokens=many"],
        ["num_draft_tokens", "must be int"],
    ),
    "option below its minimum": (
        ["--method", "draft", "--num-draft-tokens", "0"],
        ["num_draft_tokens of method 'draft' must be >= 1"],
    ),
    "malformed --option": (["--option", "novalue"], ["KEY=VALUE"]),
}


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_errors(capsys, files, case):
    argv, fragments = METHOD_CASES[case]
    rc, out, err = run_cli(capsys, "generate", "hello", *FAST, "--model", str(files["gguf"]), *argv)
    assert_one_error_line(rc, err, *fragments)
    assert out == ""


def test_draft_method_runs_and_compares(capsys, files):
    rc, out, err = run_cli(
        capsys,
        "generate",
        "hello",
        *FAST,
        "--raw",
        "--json",
        "--model",
        str(files["gguf"]),
        "--method",
        "draft",
        "--draft",
        str(files["gguf"]),
        "--compare",
    )
    assert rc == 0, err
    report = json.loads(out)
    assert report["method"] == "draft" and report["identical"] is True
    for key in ("tau", "drafted", "accepted", "draft_s", "verify_s"):
        assert key in report["stats"]
    assert report["speedup_basis"] == "time"  # greedy: the same tokens, ar time / time
    ratio = report["ar_stats"]["wall_s"] / report["stats"]["wall_s"]
    assert report["speedup"] == pytest.approx(ratio, abs=2e-3)


def test_sampled_compare_is_a_ratio_of_tokens_per_s(capsys, files, monkeypatch):
    """With temperature > 0 the outputs differ in length: --compare's speedup is the method's
    tokens/s over ar's, not ar's time over the method's. Here ar's answer is made 3 tokens
    longer than the method's, so the two ratios differ."""
    from specdec.api import Generator

    real = Generator.generate
    made = []

    def longer_ar(self, prompt, **kw):
        result = real(self, prompt, **kw)
        if kw.get("method") == "ar":
            result.stats.new_tokens = made[-1] + 3
        else:
            made.append(result.stats.new_tokens)
        return result

    monkeypatch.setattr(Generator, "generate", longer_ar)
    rc, out, err = run_cli(
        capsys,
        "generate",
        "hello",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--raw",
        "--json",
        "--model",
        str(files["gguf"]),
        "--method",
        "pld",
        "--temperature",
        "1.0",
        "--seed",
        "3",
        "--compare",
    )
    assert rc == 0, err
    report = json.loads(out)
    assert report["speedup_basis"] == "tokens_per_s" and report["identical"] is None
    mine, ar = report["stats"], report["ar_stats"]
    assert ar["new_tokens"] == mine["new_tokens"] + 3
    tps = (mine["new_tokens"] / mine["wall_s"]) / (ar["new_tokens"] / ar["wall_s"])
    assert report["speedup"] == pytest.approx(tps, abs=2e-3)
    assert report["speedup"] != pytest.approx(ar["wall_s"] / mine["wall_s"], rel=0.1)
    line = next(x for x in err.splitlines() if x.startswith("[specdec] pld:"))
    assert f"speedup {report['speedup']:.2f}x (ratio of tokens/s" in line


def test_draft_with_another_tokenizer_is_refused(capsys, files, tmp_path):
    other = save_hf_folder(tiny_hf_model("llama", seed=2), tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, another token -> id map
    (other / "tokenizer.json").write_text(json.dumps(spec))
    capsys.readouterr()  # drop what saving the folder printed
    rc, out, err = run_cli(
        capsys,
        "generate",
        "hello",
        *FAST,
        "--model",
        str(files["folder"]),
        "--method",
        "draft",
        "--draft",
        str(other),
    )
    assert_one_error_line(rc, err, "another tokenizer")


def test_profile_reports_the_step_against_the_machine(capsys, files):
    rc, out, err = run_cli(capsys, "profile", "--model", str(files["gguf"]), "--json", "--quiet")
    assert rc == 0, err
    p = json.loads(out)
    assert p["bandwidth_gbs"] > 0 and p["weight_bytes_per_step"] > 0 and p["floor_ms"] > 0
    assert p["step_ms"] == p["pass_ms"]["1"] > 0
    assert {"1", "2", "4", "8", "16"} <= set(p["pass_ms"])
    assert 0 < p["prefill_tokens"] <= 512 and p["prefill_ms"] > 0
    if p["quant"] != "none":  # the tiny Q8_0 file runs in the kernel where it can
        assert p["roofline_ms"]["1"] == p["floor_ms"] and p["int8_peak_gmacs"] > 0
        # Q8_0 takes the integer-offset path: 2 float multiply-adds per 8 vpdpbusd
        assert 0 < p["int8_mix_gmacs"] and set(p["over_mix_roofline"]) == set(p["pass_ms"])
    rc, out, err = run_cli(capsys, "profile", "--model", str(files["gguf"]), "--quiet")
    assert rc == 0 and "pass over k tokens" in out and "floor" in out


def test_python_dash_m_specdec_is_the_command():
    proc = subprocess.run(
        [sys.executable, "-m", "specdec", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("specdec "), proc.stderr
