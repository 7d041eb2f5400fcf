"""`specdec serve` as a user meets it: a real server process on loopback, the official
`openai` client, a real model (SmolLM2-135M, pulled on first use).

Greedy outputs equal `specdec generate`'s with the same method, alone or among
concurrent requests; a seed repeats a sample; and the fault battery: every bad request
gets a clear 4xx, the server keeps serving and its memory returns to idle."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
# float32 on every CPU: beside float (not quantised) weights `auto` picks bfloat16, whose
# logits tie within rounding often enough that a step's batch shape (which the server's
# timing decides) can flip a greedy token (the contract's near-tie exception)
DTYPE = "float32"
KEY = "test-key"
PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "List three colours.",
    "def fibonacci(n):",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning' into German.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, body text) of one plain HTTP request (the standard library's client)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _get(url: str, path: str, headers=None):
    return _http(url, "GET", path, headers=headers)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    cmd = [sys.executable, "-m", "specdec.cli", "serve", "--model", MODEL, "--port", str(port)]
    cmd += ["--dtype", DTYPE, "--max-batch", "4", "--max-tokens", "24", "--api-key", KEY, "--method", "pld"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    deadline = time.time() + 600  # a fresh machine pulls the model first
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the server exited: " + "".join(log))
        try:
            if _get(url, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the server did not start: " + "".join(log))
    yield url, proc, log
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local():
    """The same model in this process: what `specdec generate` produces."""
    import specdec

    return specdec.load(MODEL, progress=False, dtype=DTYPE)


def chat(client, prompt, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], **kw
    )


def test_health_models_and_metrics(server, client):
    url = server[0]
    assert json.loads(_get(url, "/health")[1])["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat(client, PROMPTS[2])
    text = _get(url, "/metrics")[1]
    for name in (
        "specdec_requests_total",
        "specdec_generation_tokens_total",
        "specdec_queue_length",
        "specdec_batch_size",
        "specdec_tokens_per_pass_bucket",
        "specdec_time_to_first_token_seconds_count",
        "specdec_time_per_output_token_seconds_sum",
    ):
        assert name in text, name
    # the engine's time by phase: the request's passes took some
    assert _metric(url, 'specdec_engine_seconds_total{phase="pass"}') > 0


@pytest.mark.parametrize("method", ["pld", "ar", "auto"])
def test_greedy_chat_equals_generate(client, local, method):
    prompt = PROMPTS[0]
    want = local.generate(prompt, max_new_tokens=24, method=method)
    got = chat(client, prompt, extra_body={"method": method})
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == want.stats.prompt_tokens
    spec = got.model_extra["speculation"]
    assert spec["method"] == method
    assert spec["target_passes"] >= 1 and spec["mean_accepted_length"] >= 1
    if method == "ar":
        assert spec["draft_tokens"] == 0


def test_streaming_equals_the_whole_response(client):
    whole = chat(client, PROMPTS[3])
    stream = chat(client, PROMPTS[3], stream=True, stream_options={"include_usage": True})
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completions_raw_and_streamed(client, local):
    want = local.generate("def add(a, b):", max_new_tokens=16, raw=True, method="pld")
    got = client.completions.create(
        model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0
    )
    assert got.choices[0].text == want.text
    streamed = client.completions.create(
        model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_a_seed_gives_the_same_sample(client):
    a = chat(client, PROMPTS[1], temperature=0.9, seed=7)
    b = chat(client, PROMPTS[1], temperature=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    c = chat(
        client,
        PROMPTS[1],
        temperature=0.9,
        top_p=0.9,
        seed=7,
        stop=["\n"],
        extra_body={"top_k": 20},
    )
    assert "\n" not in c.choices[0].message.content


def test_concurrent_greedy_requests_each_get_their_solo_output(client):
    methods = ["pld", "ar", "auto"]
    jobs = [(p, methods[i % 3]) for i, p in enumerate(PROMPTS)]
    alone = [chat(client, p, extra_body={"method": m}).choices[0].message.content for p, m in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: chat(client, j[0], extra_body={"method": j[1]}), jobs))
    assert [r.choices[0].message.content for r in together] == alone


def _status(url, body, headers=None, raw=None):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    h.update(headers or {})
    content = raw if raw is not None else json.dumps(body)
    if isinstance(content, str):
        content = content.encode()
    status, text = _http(url, "POST", "/v1/chat/completions", content, h)
    return status, json.loads(text)


def _metric(url: str, name: str) -> float:
    for line in _get(url, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _cancelled(url: str) -> float:
    lines = _get(url, "/metrics")[1].splitlines()
    return sum(
        float(x.split()[-1])
        for x in lines
        if x.startswith("specdec_requests_total") and 'status="cancelled"' in x
    )


def test_fault_battery(server, client):
    url, proc, _ = server
    chat(client, PROMPTS[2])  # warm: every allocation the battery could make is made once
    idle = _rss(proc.pid)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ("malformed JSON", None, b'{"model": "x", "messages": [', 400),
        ("not an object", None, b"[1, 2]", 400),
        ("wrong type", {"model": MODEL, "messages": msgs, "max_tokens": "ten"}, None, 400),
        ("temperature", {"model": MODEL, "messages": msgs, "temperature": -1}, None, 400),
        ("unknown model", {"model": "gpt-9", "messages": msgs}, None, 404),
        ("negative max_tokens", {"model": MODEL, "messages": msgs, "max_tokens": -5}, None, 400),
        ("zero max_tokens", {"model": MODEL, "messages": msgs, "max_tokens": 0}, None, 400),
        ("empty messages", {"model": MODEL, "messages": []}, None, 400),
        (
            "empty content",
            {"model": MODEL, "messages": [{"role": "user", "content": ""}]},
            None,
            400,
        ),
        ("n=2", {"model": MODEL, "messages": msgs, "n": 2}, None, 400),
        ("bad method", {"model": MODEL, "messages": msgs, "method": "nope"}, None, 400),
        (
            "bad option",
            {"model": MODEL, "messages": msgs, "method": "pld", "method_options": {"k": -1}},
            None,
            400,
        ),
        (
            "1 MB body",
            None,
            json.dumps({"model": MODEL, "messages": msgs, "pad": "x" * (1 << 20)}),
            413,
        ),
    ]
    for name, body, raw, want in cases:
        status, err = _status(url, body, raw=raw)
        assert status == want, (name, status, err)
        assert err["error"]["message"], name
    # a prompt beyond the context (SmolLM2: 8,192 tokens)
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}
    status, err = _status(url, long)
    assert status == 400 and "context" in err["error"]["message"]
    # a huge max_tokens is cut to the context: a completed response
    status, ok = _status(
        url,
        {"model": MODEL, "messages": msgs, "max_tokens": 10**9, "temperature": 0, "stop": ["."]},
    )
    assert status == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length")
    # a wrong or missing key
    status, err = _status(
        url, {"model": MODEL, "messages": msgs}, {"Authorization": "Bearer wrong"}
    )
    assert status == 401
    assert _get(url, "/v1/models")[0] == 401
    # a client that disconnects mid-stream frees its slot
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"model": MODEL, "messages": msgs, "max_tokens": 2000, "stream": True}
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {KEY}"},
    )
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(4):
        r.readline()
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10  # its slot is freed at the next step, long before 2,000 tokens
    while time.time() < deadline and not _cancelled(url):
        time.sleep(0.1)
    assert _cancelled(url) == 1
    # 100 requests at once: each completes (or is told to retry); none sees another's tokens
    want = chat(client, PROMPTS[5], max_tokens=8).choices[0].message.content

    def one(_):
        try:
            return chat(client, PROMPTS[5], max_tokens=8).choices[0].message.content
        except openai.RateLimitError:
            return None

    with ThreadPoolExecutor(100) as pool:
        got = list(pool.map(one, range(100)))
    assert all(g is None or g == want for g in got) and got.count(want) >= 50
    deadline = time.time() + 60
    while time.time() < deadline and (
        _metric(url, "specdec_running_requests") or _metric(url, "specdec_queue_length")
    ):
        time.sleep(0.2)
    assert _metric(url, "specdec_running_requests") == 0
    assert _metric(url, "specdec_kv_reserved_bytes") == 0
    assert proc.poll() is None  # still serving
    assert chat(client, PROMPTS[5], max_tokens=8).choices[0].message.content == want
    time.sleep(2.5)  # the server gives freed memory back after a quiet second
    assert _rss(proc.pid) < idle + 150 * 2**20  # back near idle (allocator slack)


def test_the_load_harness_measures_the_server(server, local):
    """`specdec.bench.load` (the load benchmark's client): every request's greedy text is
    the one `generate` gives, counted by the server's usage; a run saved and read back
    is the same run; the engine's time by phase grew by the run's passes."""
    from specdec.bench.load import LoadResult, engine_seconds, run_load

    url = server[0]
    messages = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    before = engine_seconds(url)
    r = run_load(url, MODEL, messages, 2, 4, 12, api_key=KEY)
    after = engine_seconds(url)
    assert r.errors == 0 and r.requests == 4 and r.counted_by == "usage"
    assert r.tokens == sum(x.tokens for x in r.results) > 0 and r.throughput > 0
    want = [local.generate(m[0]["content"], max_new_tokens=12, method="pld").text for m in messages]
    assert [x.text for x in r.results] == [want[i % 3] for i in range(4)]
    assert r.tau is not None and r.tau >= 1
    assert LoadResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert after["pass"] > before.get("pass", 0.0)
    assert engine_seconds("http://127.0.0.1:1") == {}  # nobody there: nothing, no traceback
