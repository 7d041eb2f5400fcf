"""Real packaged models (pulled on demand): parity with transformers, tokenizer, CLI.

Marked `real_model`; `.ci/run` runs them. They use the cache in $SPECDEC_CACHE.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

PARITY_MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b"]


@pytest.mark.parametrize("model", PARITY_MODELS)
def test_logits_and_greedy_match_transformers(model, record_property):
    from benchmarks.parity import check_parity

    report = check_parity(model)
    record_property("parity", json.dumps(report))
    print(json.dumps(report))
    assert report["tokens"] == 256
    assert report["argmax_equal_every_position"]
    assert report["max_abs_logit_diff"] < 1e-3 * report["logit_scale"]
    assert report["greedy_identical"]


TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Ünïcödé — emoji 🤖 and 中文字符 mixed with numbers 1234567890",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Write a function"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
]


@pytest.mark.parametrize("model", PARITY_MODELS)
def test_tokenizer_matches_transformers(model):
    from transformers import AutoTokenizer

    from specdec.models.catalog import pull
    from specdec.models.loading import converted_folder
    from specdec.models.tokenizer import Tokenizer

    path = pull(model, progress=False)
    ours = Tokenizer(converted_folder(path, progress=False))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
            ids, skip_special_tokens=True
        )
    for chat in CHATS:
        for gen_prompt in (True, False):
            text = theirs.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen_prompt
            )
            assert ours.apply_chat_template(chat, add_generation_prompt=gen_prompt) == text
            ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen_prompt)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours.encode_chat(chat, add_generation_prompt=gen_prompt) == list(ids)
    assert theirs.convert_tokens_to_ids(theirs.eos_token) in ours.eos_token_ids


def test_cli_generate_streams_on_real_model(tmp_path):
    """The README's first command, on the small model: text on stdout, a summary on stderr."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "generate",
            "Write a Python function that reverses a string",
            "--model",
            "smollm2-135m",
            "--max-new-tokens",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "def" in proc.stdout
    assert "tok/s" in proc.stderr.splitlines()[-1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "generate",
            "-",
            "--model",
            "smollm2-135m",
            "--max-new-tokens",
            "8",
            "--json",
            "--quiet",
        ],
        input="Say hi",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stats"]["new_tokens"] == len(out["token_ids"]) <= 8
    for key in ("new_tokens", "target_passes", "wall_s", "prefill_s", "tokens_per_s"):
        assert key in out["stats"]


def test_models_lists_pulled_paths():
    from specdec.models.catalog import pull

    path = pull("smollm2-135m", progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "models", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(rows)
    assert Path(rows["smollm2-135m"]["path"]) == path


def _generate_json(*args: str, stdin: str | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "generate", *args, "--json", "--quiet"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


COPY_PROMPT = (
    "Repeat this code exactly, then stop:\n\n"
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n"
    "        else:\n            out.append(b[j])\n            j += 1\n"
    "    return out + a[i:] + b[j:]\n"
)


@pytest.mark.parametrize("method", ["pld", "recycle", "ngram-cache", "pld+recycle"])
def test_model_free_methods_on_a_real_model_are_exact_and_draft(method):
    """SmolLM2-135M in float32 asked to repeat code: same tokens as ar, more than one token
    per target pass for the copying methods."""
    out = _generate_json(
        "-",
        "--model",
        "smollm2-135m",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "64",
        "--method",
        method,
        "--compare",
        stdin=COPY_PROMPT,
    )
    assert out["identical"] is True
    assert out["stats"]["drafted"] > 0
    if method in ("pld", "pld+recycle"):
        assert out["stats"]["tau"] > 1.5


def test_rest_with_a_datastore_built_from_the_command_line(tmp_path):
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    store = tmp_path / "store"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "datastore",
            "build",
            "--model",
            "smollm2-135m",
            "--input",
            str(stdlib / "heapq.py"),
            str(stdlib / "bisect.py"),
            "--out",
            str(store),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == store and (store / "meta.json").exists()
    out = _generate_json(
        "Write a Python function heappush(heap, item) that pushes onto a heap.",
        "--model",
        "smollm2-135m",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "48",
        "--method",
        "rest",
        "--option",
        f"datastore={store}",
        "--compare",
    )
    assert out["identical"] is True
    assert out["stats"]["drafted"] > 0
