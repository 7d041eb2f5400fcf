"""`specdec bench` end to end on a tiny random model: every output file and field, the report,
the plots, `--compare-to`, `--server` against a local stub, a planted difference, bad inputs."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import statistics
import threading
from pathlib import Path

import pytest
import torch
from fixtures import VOCAB, save_hf_folder, tiny_hf_model

from specdec.bench import machine, questions, report
from specdec.bench import runners as R
from specdec.cli import main
from specdec.errors import SpecdecError
from specdec.models.tokenizer import Tokenizer

ROW_KEYS = {
    "drafters",
    "predicted_ms",
    "ar_predicted_ms",
    "predicted_speedup",
    "method",
    "question_id",
    "category",
    "subcategory",
    "turns",
    "prompt_tokens",
    "new_tokens",
    "target_passes",
    "drafted",
    "accepted",
    "tau",
    "wall_s",
    "tokens_per_s",
    "ar_wall_s",
    "ar_new_tokens",
    "speedup",
    "prefill_s",
    "ar_prefill_s",
    "identical",
    "first_diff",
    "finish_reason",
    "output",
    "token_ids",
}
STAT_KEYS = {
    "drafters",
    "prompts",
    "new_tokens",
    "wall_s",
    "target_passes",
    "tau",
    "tokens_per_s",
    "tokens_per_s_median",
    "speedup_sum",
    "speedup_median",
    "identical",
    "compared",
    "identical_share",
    "predicted_speedup",
    "decode_speedup_sum",
}
QUESTIONS = [
    {"question_id": 1, "category": "chat", "turns": ["hello there", "and then?"]},
    {"question_id": "two", "category": "chat", "turns": ["the cat sat"]},
    {"question_id": 3, "category": "code", "turns": ["def f(x): return x"]},
    {"question_id": 4, "category": "math", "turns": ["2+2=?"]},
    {"question_id": 5, "category": "math", "turns": ["long " * 80]},  # over the 256-token context
]
METHODS = "ar,draft,draft@tree,hf-ar,hf-assisted,hf-pld,llamacpp-ar,auto"
FAST = ["--dtype", "float32", "--max-new-tokens", "12", "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = save_hf_folder(tiny_hf_model("llama", seed=0).float(), root / "target")
    draft = save_hf_folder(tiny_hf_model("llama", seed=1).float(), root / "draft")
    data = root / "q.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECDEC_CACHE", str(root / "cache"))
        mp.setattr(machine, "measure_bandwidth_gbs", lambda *a, **k: 12.5)
        yield {"root": root, "target": target, "draft": draft, "data": data}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def main_run(env):
    out = env["root"] / "run1"
    argv = ["--model", env["target"], "--methods", METHODS, "--draft", env["draft"]]
    argv += ["--option", "draft.num_draft_tokens=3", "--option", "draft@tree.tree=2,1"]
    argv += ["--dataset", env["data"], "--out", out]
    assert main(["bench", *map(str, argv), *FAST]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, json.loads((out / "summary.json").read_text())


def test_results_rows(main_run, env):
    out, rows, summary = main_run
    ran = [m for m in METHODS.split(",") if m not in summary["skipped_methods"]]
    assert ran[:6] == ["ar", "draft", "draft@tree", "hf-ar", "hf-assisted", "hf-pld"]
    if R.llama_cpp_available() is not None:
        assert "not installed" in summary["skipped_methods"]["llamacpp-ar"]
    fitting = [q for q in QUESTIONS if q["question_id"] != 5]
    assert len(rows) == len(ran) * len(fitting)
    assert [r["method"] for r in rows[: len(ran)]] == ran  # interleaved: all methods per question
    for r in rows:
        assert set(r) == ROW_KEYS
        q = next(q for q in fitting if q["question_id"] == r["question_id"])
        assert r["category"] == q["category"] and r["turns"] == len(q["turns"])
        assert len(r["output"]) == len(r["token_ids"]) == r["turns"]
        assert r["new_tokens"] == sum(map(len, r["token_ids"])) <= 12 * r["turns"]
        assert r["wall_s"] > 0 and r["tokens_per_s"] == pytest.approx(
            r["new_tokens"] / r["wall_s"], rel=1e-3
        )
        assert r["target_passes"] >= r["turns"]
        assert r["tau"] == pytest.approx(r["new_tokens"] / r["target_passes"], abs=1e-3)
        assert r["speedup"] == pytest.approx(r["ar_wall_s"] / r["wall_s"], rel=1e-3)  # greedy
        ar = next(a for a in rows if a["method"] == "ar" and a["question_id"] == r["question_id"])
        assert r["ar_new_tokens"] == ar["new_tokens"] and r["ar_wall_s"] == ar["wall_s"]
        if r["method"] == "ar":
            assert r["identical"] is None and r["first_diff"] is None
            assert r["drafted"] == 0 and r["tau"] == 1.0
        else:  # lossless: identical, or a float32 near-tie with its margin
            assert isinstance(r["identical"], bool)
            assert r["identical"] or r["first_diff"]["top2_margin"] < 1e-3
        if r["method"] == "draft":
            assert r["drafted"] > 0 and r["accepted"] is not None
        if r["method"].startswith(("ar", "draft", "auto")):  # the cost model: specdec methods
            assert r["predicted_ms"] > 0 and r["ar_predicted_ms"] >= 0
            assert r["predicted_speedup"] == pytest.approx(
                r["ar_predicted_ms"] / r["predicted_ms"], rel=1e-3
            )
        if r["method"].startswith(("ar", "draft", "auto")):  # specdec methods time their prefill
            assert 0 < r["prefill_s"] < r["wall_s"] and 0 < r["ar_prefill_s"] < r["ar_wall_s"]
        if r["method"].startswith("hf-"):
            assert r["drafted"] is None and r["predicted_speedup"] is None
            assert r["prefill_s"] is None
        if r["method"] == "auto":  # which drafters it ran, and what each earned
            used = r["drafters"]
            assert set(used) <= {"ar", "pld", "ngram-cache", f"draft:{env['draft']}"}
            assert sum(u["tokens"] for u in used.values()) == r["new_tokens"] - r["turns"]
            assert sum(u["drafted"] for u in used.values()) == r["drafted"]
        else:
            assert r["drafters"] is None
    # the second turn ran with ar's first answer in the history: longer prompt than turn 1 alone
    ar1 = next(r for r in rows if r["method"] == "ar" and r["question_id"] == 1)
    assert ar1["prompt_tokens"] > 2 * len("hello there")


def test_summary(main_run, env):
    out, rows, s = main_run
    assert s["command"].startswith("specdec bench --model ")
    assert "--methods" in s["argv"] and METHODS in s["argv"]
    assert s["versions"]["torch"] and s["versions"]["transformers"] and s["versions"]["specdec"]
    assert {"cpu_count", "torch_threads", "bandwidth_gbs", "memory_gb"} <= set(s["machine"])
    assert s["machine"]["bandwidth_gbs"] == 12.5
    st = s["settings"]
    assert st["dtype"] == "float32" and st["max_new_tokens"] == 12 and st["temperature"] == 0
    assert st["model"] == str(env["target"]) and st["context"] == 256
    weights = {Path(f["path"]).name: f for f in s["model_files"]["target"]["files"]}
    assert re.fullmatch(r"[0-9a-f]{64}", weights["model.safetensors"]["sha256"])
    assert s["model_files"]["drafts"][0]["name"] == str(env["draft"])
    assert s["dataset"]["questions"] == 5 and s["dataset"]["categories"] == {
        "chat": 2,
        "code": 1,
        "math": 2,
    }
    assert re.fullmatch(r"[0-9a-f]{64}", s["dataset"]["files"][0]["sha256"])
    assert [q["question_id"] for q in s["skipped_questions"]] == [5]
    assert s["methods"]["draft"]["options"]["num_draft_tokens"] == 3
    assert s["methods"]["draft"]["lossless"] is True
    assert s["methods"]["draft@tree"]["options"]["tree"] == "2,1"  # a variant of one method
    assert s["methods"]["draft@tree"]["options"]["num_draft_tokens"] == 4
    assert s["methods"]["hf-pld"]["options"] == {"prompt_lookup_num_tokens": 10}
    assert s["methods"]["hf-assisted"]["options"]["num_assistant_tokens"] is not None
    for m, res in s["results"].items():
        assert set(res["overall"]) == STAT_KEYS
        assert set(res["categories"]) == {"chat", "code", "math"}
        assert res["overall"]["prompts"] == 4
        mine = [r for r in rows if r["method"] == m]
        total = sum(r["ar_wall_s"] for r in mine) / sum(r["wall_s"] for r in mine)
        assert res["overall"]["speedup_sum"] == pytest.approx(total, rel=1e-3)
        if m.startswith(("ar", "draft", "auto")):  # the same ratio with each run's prefill taken off
            after = sum(r["ar_wall_s"] - r["ar_prefill_s"] for r in mine) / sum(
                r["wall_s"] - r["prefill_s"] for r in mine
            )
            assert res["overall"]["decode_speedup_sum"] == pytest.approx(after, rel=1e-3)
        else:
            assert res["overall"]["decode_speedup_sum"] is None
    assert s["results"]["ar"]["overall"]["speedup_sum"] == 1.0
    assert s["speedup_basis"] == "time"  # greedy: ratios of times
    assert s["results"]["ar"]["overall"]["identical"] is None
    assert s["results"]["draft"]["overall"]["compared"] == 4
    assert s["differences"] == report.differences(rows)


def _md_tables(text: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip("|").split("|")])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def test_report_and_plots(main_run):
    out, rows, s = main_run
    md = (out / "report.md").read_text()
    for heading in (
        "## Overall",
        "## Per category",
        "### τ",
        "### Tokens/s",
        "### Identical to ar",
        "### Speedup over ar after the prompt",
        "## What auto ran",
    ):
        assert heading in md
    assert s["command"] in md
    for m, why in s["skipped_methods"].items():
        assert f"{m} skipped: {why}" in md
    assert "Speedups are ratios of times" in md
    tables = _md_tables(md)
    assert len(tables) >= 6
    for t in tables:
        assert len({len(row) for row in t}) == 1  # every row as wide as its header
        assert set(t[1]) == {"---"}
    overall = tables[0]
    assert [row[0] for row in overall[2:]] == list(s["results"])
    assert "speedup (Σ time)" in overall[0]
    assert tables[1][0] == ["method", "chat", "code", "math", "overall"]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == sorted(report.PLOTS)
    import matplotlib.image

    for name in report.PLOTS:
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 0  # not blank


def test_compare_to(main_run, env, capsys):
    out, _, s = main_run
    old = env["root"] / "run-old"
    shutil.copytree(out, old, dirs_exist_ok=True)
    changed = json.loads((old / "summary.json").read_text())
    changed["results"]["draft"]["overall"]["tokens_per_s"] = 1.0
    changed["settings"]["max_new_tokens"] = 99
    del changed["results"]["hf-pld"]
    (old / "summary.json").write_text(json.dumps(changed))
    rc, text, err = run(capsys, "--no-run", "--compare-to", old, "--out", out)
    assert rc == 0, err
    assert "setting max_new_tokens: 99 → 12" in text
    draft = next(line for line in text.splitlines() if line.startswith("draft "))
    assert "1.0 → " in draft and "%" in draft
    assert "hf-pld" in text and "only in new" in text
    assert "per category:" in text


def test_planted_difference_is_found(env, capsys, monkeypatch):
    """A method whose output departs from ar's at position 3: first_diff and the target's margin
    there, checked against transformers' own forward over the prompt and ar's first 3 tokens."""
    original = R.SpecdecRunner.run

    def planted(self, *a, **k):
        o = original(self, *a, **k)
        if self.name == "draft":
            o.token_ids[3] = (o.token_ids[3] + 1) % VOCAB
        return o

    monkeypatch.setattr(R.SpecdecRunner, "run", planted)
    data = env["root"] / "one.jsonl"
    data.write_text(json.dumps({"question_id": "q", "category": "c", "turns": ["the cat"]}) + "\n")
    out = env["root"] / "planted"
    argv = ["--model", env["target"], "--methods", "ar,draft", "--draft", env["draft"]]
    rc, _, err = run(capsys, *argv, "--dataset", data, "--out", out, *FAST)
    assert rc == 0, err
    ar, draft = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert draft["identical"] is False
    d = draft["first_diff"]
    assert d["turn"] == 0 and d["position"] == 3
    assert d["ar_token"] == ar["token_ids"][0][3]
    assert d["method_token"] == (ar["token_ids"][0][3] + 1) % VOCAB
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(env["target"]), dtype=torch.float32
    )
    ids = Tokenizer(env["target"]).encode_chat([{"role": "user", "content": "the cat"}])
    with torch.no_grad():
        logits = model(torch.tensor([ids + ar["token_ids"][0][:3]])).logits[0, -1]
    top = torch.topk(logits, 2)
    assert d["target_top2"][0] == int(top.indices[0]) == d["ar_token"]
    assert d["top2_margin"] == pytest.approx(float(top.values[0] - top.values[1]), abs=1e-3)
    s = json.loads((out / "summary.json").read_text())
    assert s["differences"][0]["position"] == 3
    assert s["results"]["draft"]["overall"]["identical_share"] == 0.0
    md = (out / "report.md").read_text()
    assert "## Outputs that differ from ar" in md and "| draft | yes | q | 1 | 3 |" in md


class _Stub(http.server.BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 -- the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        n = len(type(self).requests)
        reply = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": f"answer {n}"},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_server(env, main_run, capsys):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = env["root"] / "server"
        url = f"http://127.0.0.1:{srv.server_port}"
        rc, text, err = run(
            capsys,
            "--server",
            url,
            "--model",
            "some-model",
            "--dataset",
            env["data"],
            "--out",
            out,
            "--max-new-tokens",
            "5",
            "--quiet",
            "--compare-to",
            main_run[0],
        )
    finally:
        srv.shutdown()
    assert rc == 0, err
    reqs = _Stub.requests
    assert all(r["path"] == "/v1/chat/completions" and r["model"] == "some-model" for r in reqs)
    assert reqs[1]["max_tokens"] == 5 and reqs[1]["temperature"] == 0
    # warm-up, then q1 turn 1, q1 turn 2 with the server's own first answer in the history
    assert reqs[2]["messages"][1] == {"role": "assistant", "content": "answer 2"}
    assert len(reqs) == 1 + 6  # warm-up + 2 + 1 + 1 + 1 + 1 (no context limit on a server)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"server"} and len(rows) == 5
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["new_tokens"] == 5 * r["turns"] and r["wall_s"] > 0
        assert r["tau"] is None and r["speedup"] is None and r["identical"] is None
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["server"] == url and s["model_files"] is None
    assert s["methods"]["server"]["url"] == url + "/v1/chat/completions"
    assert "# specdec bench: " + url in (out / "report.md").read_text()
    for name in report.PLOTS:
        assert (out / name).stat().st_size > 1000
    assert "comparing" in text and "only in new" in text and "only in old" in text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "unknown method": (["--methods", "ar,nope"], "unknown method 'nope'"),
    "missing dataset": (["--dataset", "/nonexistent/q.jsonl"], "no such dataset file"),
    "unknown dataset": (["--dataset", "specbench"], "unknown dataset 'specbench'"),
    "bad json": (["--dataset", "{bad}"], "line 2: not valid JSON"),
    "bad turns": (["--dataset", "{turns}"], "line 1: turns must be"),
    "unknown category": (["--categories", "poetry"], "no category 'poetry'"),
    "option for a method not run": (["--option", "draft.num_draft_tokens=3"], "not among"),
    "bad option value": (
        ["--methods", "ar,draft", "--draft", "x", "--option", "draft.num_draft_tokens=zz"],
        "num_draft_tokens",
    ),
    "assisted without draft": (["--methods", "ar,hf-assisted"], "needs a draft model"),
    "unreachable server": (["--server", "http://127.0.0.1:{port}"], "cannot reach server"),
    "server and methods": (["--server", "http://x", "--methods", "ar"], "drop --methods"),
    "no-run alone": (["--no-run"], "--no-run needs"),
    "compare to nothing": (["--compare-to", "/nonexistent"], "no summary.json"),
    "zero tokens": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "warm without limit": (["--warm-questions", "1"], "--warm-questions needs --limit"),
    "nothing left to warm on": (
        ["--warm-questions", "1", "--limit", "2"],
        "no questions left after the first 2",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case, env, capsys, tmp_path):
    argv, fragment = BAD[case]
    (tmp_path / "bad.jsonl").write_text(
        '{"question_id": 1, "category": "a", "turns": ["x"]}\n{"question_id": 2,\n'
    )
    (tmp_path / "turns.jsonl").write_text('{"question_id": 1, "category": "a", "turns": "x"}\n')
    subs = {"{bad}": str(tmp_path / "bad.jsonl"), "{turns}": str(tmp_path / "turns.jsonl")}
    argv = [subs.get(a, a).replace("{port}", str(_closed_port())) for a in argv]
    if "--dataset" not in argv:
        argv += ["--dataset", str(env["data"])]
    rc, out, err = run(
        capsys, "--model", env["target"], *argv, "--out", tmp_path / "out", "--quiet"
    )
    assert rc == SpecdecError.exit_code
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error:"), err
    assert fragment in lines[0]


def test_builtin_datasets():
    sb = questions.load_dataset("spec-bench")
    assert len(sb.questions) == 480
    assert sb.categories == [
        "mt_bench",
        "translation",
        "summarization",
        "qa",
        "math_reasoning",
        "rag",
    ]
    assert all(len(q.turns) == 2 for q in sb.questions if q.category == "mt_bench")
    assert {q.subcategory for q in sb.questions if q.category == "mt_bench"} == set(
        questions.MT_BENCH_CATEGORIES
    )
    he, gs = questions.load_dataset("humaneval"), questions.load_dataset("gsm8k")
    assert len(he.questions) == 164 and he.questions[0].question_id == "HumanEval/0"
    assert "def has_close_elements" in he.questions[0].turns[0]
    assert len(gs.questions) == 1319 and gs.categories == ["math"]
    mixed = questions.load_dataset("mixed")
    assert mixed.categories == ["code", "chat", "summarization", "math"]
    assert len(mixed.questions) == 32
    pick = sb.select(["summarization", "writing"], limit=2)
    assert [q.question_id for q in pick.questions] == [81, 82, 241, 242]
    after = sb.select(["summarization", "writing"], limit=2, skip=2)
    assert [q.question_id for q in after.questions] == [83, 84, 243, 244]
    for ds in (sb, he, gs):  # shipped with their licences
        folder = Path(ds.files[0]["path"]).parent
        assert any(p.name.startswith("LICENSE") for p in folder.iterdir())


def test_warm_questions_run_untimed_before_the_measured_ones(env, tmp_path, monkeypatch):
    """--warm-questions: every specdec method but ar first runs the questions after the
    measured ones (turn by turn), and only the measured ones are timed and reported."""
    calls = []
    real = R.SpecdecRunner.run

    def spy(self, messages, ids, budget, temperature, seed):
        calls.append((self.name, messages[0]["content"], len(messages)))
        return real(self, messages, ids, budget, temperature, seed)

    monkeypatch.setattr(R.SpecdecRunner, "run", spy)
    out = tmp_path / "warm"
    argv = ["--model", env["target"], "--methods", "ar,recycle", "--dataset", env["data"]]
    argv += ["--limit", "1", "--warm-questions", "1", "--out", out, *FAST]
    assert main(["bench", *map(str, argv)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["warm_question_ids"] == ["two", 5]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["question_id"] for r in rows} == {1, 3, 4}
    measured_start = calls.index(("ar", "hello there", 1), 2)  # after the two warm-up turns
    warm = calls[2:measured_start]  # calls[:2]: the 8-token warm-up of ar and recycle
    # question 5 does not fit the context: only "the cat sat" is run, by recycle alone
    assert warm == [("recycle", "the cat sat", 1)]
    assert "hot start" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- sampled runs
def fake_row(method, qid, category, new, wall, ar_new, ar_wall, basis, turns=1, prefill=None):
    """A results row with just what the aggregates read (prefill: its own and ar's)."""
    ratio = report.speedup(basis, new, wall, ar_new, ar_wall)
    return {
        "method": method,
        "question_id": qid,
        "category": category,
        "turns": turns,
        "new_tokens": new,
        "wall_s": wall,
        "tokens_per_s": new / wall,
        "target_passes": None,
        "ar_new_tokens": ar_new,
        "ar_wall_s": ar_wall,
        "speedup": ratio,
        "prefill_s": prefill[0] if prefill else None,
        "ar_prefill_s": prefill[1] if prefill else None,
        "predicted_ms": None,
        "ar_predicted_ms": None,
        "identical": None,
        "first_diff": None,
    }


# four prompts at temperature 1.0: pld makes more tokens than ar in a little more time.
# ar 382 tokens in 20.0 s (19.1 tokens/s), pld 454 in 20.62 s (22.0 tokens/s): 1.15x the
# throughput, where the ratio of times says 0.97x
SAMPLED = [  # question, category, (ar tokens, ar s, its prefill s), (pld ...)
    (1, "chat", (90, 5.0, 0.5), (120, 5.3, 0.5)),
    (2, "chat", (100, 5.0, 0.5), (110, 5.12, 0.5)),
    (3, "code", (96, 5.0, 0.5), (104, 5.1, 0.5)),
    (4, "code", (96, 5.0, 0.5), (120, 5.1, 0.5)),
]


def sampled_rows(basis: str) -> list[dict]:
    rows = []
    for qid, cat, (an, aw, ap), (pn, pw, pp) in SAMPLED:
        rows.append(fake_row("ar", qid, cat, an, aw, an, aw, basis, prefill=(ap, ap)))
        rows.append(fake_row("pld", qid, cat, pn, pw, an, aw, basis, prefill=(pp, ap)))
    return rows


def test_sampled_speedups_are_ratios_of_tokens_per_s():
    assert report.speedup_basis(0.0) == "time" and report.speedup_basis(1.0) == "tokens_per_s"
    pld = report.aggregate(sampled_rows("tokens_per_s"), "tokens_per_s")["pld"]["overall"]
    assert pld["tokens_per_s"] == pytest.approx(22.0, abs=0.05)
    assert pld["speedup_sum"] == pytest.approx((454 / 20.62) / (382 / 20.0), rel=1e-5)
    assert pld["speedup_sum"] == pytest.approx(1.15, abs=0.01)  # not 0.97: the same work
    per_prompt = [(pn / pw) / (an / aw) for _, _, (an, aw, _), (pn, pw, _) in SAMPLED]
    assert pld["speedup_median"] == pytest.approx(statistics.median(per_prompt), rel=1e-5)
    # after the prompt: each turn's prefill off the time, and the token it makes off the count
    after = ((454 - 4) / (20.62 - 2.0)) / ((382 - 4) / (20.0 - 2.0))
    assert pld["decode_speedup_sum"] == pytest.approx(after, rel=1e-5)
    code = report.aggregate(sampled_rows("tokens_per_s"), "tokens_per_s")["pld"]["categories"]
    assert code["code"]["speedup_sum"] == pytest.approx((224 / 10.2) / (192 / 10.0), rel=1e-5)
    # greedy runs keep the ratio of times (the same tokens)
    timed = report.aggregate(sampled_rows("time"))["pld"]["overall"]
    assert timed["speedup_sum"] == pytest.approx(20.0 / 20.62, rel=1e-5)
    assert timed["decode_speedup_sum"] == pytest.approx(18.0 / 18.62, rel=1e-5)
    ar = report.aggregate(sampled_rows("tokens_per_s"), "tokens_per_s")["ar"]["overall"]
    assert ar["speedup_sum"] == ar["speedup_median"] == 1.0


def _summary(rows, basis: str | None, temperature: float) -> dict:
    """A summary.json as `compare_runs` reads it; basis None: one from before the field,
    every speedup a ratio of times."""
    s = {
        "settings": {"temperature": temperature},
        "results": report.aggregate(rows, basis or "time"),
    }
    if basis is not None:
        s["speedup_basis"] = basis
    return s


def test_compare_to_an_old_sampled_run_on_the_tokens_per_s_basis(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    for folder, summary in (
        (new, _summary(sampled_rows("tokens_per_s"), "tokens_per_s", 1.0)),
        (old, _summary(sampled_rows("time"), None, 1.0)),
    ):
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(summary))
    text = report.compare_runs(new, old)
    assert "speedup basis: time → tokens_per_s" in text
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert "speedup (tokens/s)" in header and "Σ time" not in header
    pld = next(line for line in text.splitlines() if line.startswith("pld "))
    # the old run's Σ speedup recomputed from its totals: the same rows, no change
    assert "1.153 → 1.153 (+0.0 %)" in pld and "0.970" not in pld
    assert "— → " in pld  # its median is not comparable
    cats = [line for line in text.splitlines() if line.strip().startswith("pld ")]
    assert cats and all("(+0.0 %)" in line for line in cats)
    # the same basis on both sides: as stored, no note
    text = report.compare_runs(new, new)
    assert "speedup basis" not in text
    assert "1.153 → 1.153" in next(line for line in text.splitlines() if line.startswith("pld "))


def test_sampled_bench_run(env, capsys, monkeypatch, tmp_path):
    """At temperature 1.0 the rows, aggregates, report and plots use tokens/s ratios. pld's
    answers count 24 tokens more than they have (over the budget of 12: more than ar's), so
    that a ratio of times would differ."""
    original = R.SpecdecRunner.run

    def longer(self, *a, **k):
        o = original(self, *a, **k)
        if self.name == "pld":
            o.new_tokens += 24
        return o

    monkeypatch.setattr(R.SpecdecRunner, "run", longer)
    out = tmp_path / "sampled"
    argv = ["--model", env["target"], "--methods", "ar,pld", "--dataset", env["data"]]
    argv += ["--temperature", "1.0", "--out", out, *FAST]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    s = json.loads((out / "summary.json").read_text())
    assert s["speedup_basis"] == "tokens_per_s"
    pld = [r for r in rows if r["method"] == "pld"]
    for r in pld:
        assert r["new_tokens"] >= 2 * r["ar_new_tokens"]
        tps = (r["new_tokens"] / r["wall_s"]) / (r["ar_new_tokens"] / r["ar_wall_s"])
        assert r["speedup"] == pytest.approx(tps, rel=1e-3)
        assert r["speedup"] != pytest.approx(r["ar_wall_s"] / r["wall_s"], rel=0.1)
    total = s["results"]["pld"]["overall"]
    new, wall = sum(r["new_tokens"] for r in pld), sum(r["wall_s"] for r in pld)
    ar_new, ar_wall = sum(r["ar_new_tokens"] for r in pld), sum(r["ar_wall_s"] for r in pld)
    assert total["speedup_sum"] == pytest.approx((new / wall) / (ar_new / ar_wall), rel=1e-3)
    assert total["decode_speedup_sum"] is not None
    md = (out / "report.md").read_text()
    assert "Speedups are ratios of tokens/s" in md and "sampled" in md
    assert "### Speedup over ar (method's tokens/s ÷ ar's tokens/s)" in md
    assert "### Speedup over ar after the prompt" in md
    assert "speedup (tokens/s)" in _md_tables(md)[0][0]
    for name in report.PLOTS:
        assert (out / name).stat().st_size > 1000
