"""Continuous batching: many requests decode together, one target pass per step.

Requests join the running batch between steps and leave it when they finish or are
cancelled. Each step every running request drafts its tree (as much as goodput
control allows: `specdec.speculation.goodput`), a new request brings its prompt (a
long one in parts over several steps), and one pass of the target
(`Transformer.forward_batch`) runs all of them, each sequence in its own KV cache;
then each request verifies its tree and commits its tokens.
A request's arithmetic is the same as alone (the native kernels are per row), so
its greedy output never depends on what else is in the batch.

The engine is driven by one thread (`BatchEngine.run` or `step` in a loop); `submit`
and `BatchRequest.cancel` may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from specdec.engine import Decoding, Pass, run_pass
from specdec.models.target import NativeTarget
from specdec.models.transformer import Segment, Transformer
from specdec.speculation.drafters.base import layer_features
from specdec.speculation.goodput import Acceptance, GoodputControl

# prompt tokens per step: a part of 128 runs in ~0.7 s on the 1.5B Q4_K_M, against ~5 s for
# a 700-token prompt whole, which every decoding request in the batch would wait for
PREFILL_ROWS = 128

# where a step's time goes (`BatchEngine.phase_s`): building drafters and other calls
# between steps, admitting requests, their prompts' parts, goodput control, drafting,
# the target's pass, verifying and committing, ending requests
PHASES = ("calls", "join", "prompt", "control", "draft", "pass", "verify", "end")

T = TypeVar("T")


@dataclass
class BatchRequest:
    """One request in the batch: its decoding, where its text goes, and how it ended.

    ``on_text(piece)`` is called from the engine's thread with each new piece of text;
    ``on_end(request)`` once, when it finished, failed (``error``) or was cancelled.
    ``release()`` (if given) runs after that, to give back what the request held.
    """

    decoding: Decoding
    on_text: Callable[[str], None] | None = None
    on_end: Callable[[BatchRequest], None] | None = None
    release: Callable[[], None] | None = None
    error: BaseException | None = None
    cancelled: bool = False
    acceptance: Acceptance = field(default_factory=Acceptance)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # from submission
    ended: threading.Event = field(default_factory=threading.Event)
    need: int = 0  # bytes it reserves when it joins (see BatchEngine's ``admit``)
    max_nodes: int | None = None  # most nodes it may draft in a step (None: no limit)
    draft_ms: float = 0.0  # what asking its drafter costs, smoothed over its steps
    reserved: int = 0
    method: str = ""
    # seconds its clock leaves out: of each shared pass, what its own rows would not cost alone
    left_out_s: float = 0.0

    def cancel(self) -> None:
        """Stop at the next step (its slot is freed then)."""
        self.cancelled = True

    def clock(self) -> float:
        """The request's own clock (`DraftState.clock`)."""
        return time.perf_counter() - self.left_out_s


class BatchEngine:
    """Runs the requests submitted to it, up to ``max_batch`` at a time.

    ``model``: the target all requests share (their `NativeTarget`s hold their own
    caches over it); None, or requests on other targets, run their passes one after
    another instead of in one pass. ``control``: goodput control of how much each
    request drafts (None: every drafter sizes its own tree). ``admit(request)``: whether
    a waiting request may join now (e.g. its memory fits); requests join in order.
    ``pass_ms(n)``: what a pass over ``n`` rows costs alone (default: ``control``'s), the
    price of a shared pass on each request's clock (None: the wall clock).
    ``prefill_rows``: the most prompt tokens one step runs (None: every new prompt whole);
    a longer prompt runs in parts over several steps, the decoding requests beside it
    taking a step each time.
    """

    def __init__(
        self,
        model: Transformer | None,
        *,
        max_batch: int = 16,
        control: GoodputControl | None = None,
        admit: Callable[[BatchRequest], bool] | None = None,
        pass_ms: Callable[[int], float] | None = None,
        prefill_rows: int | None = PREFILL_ROWS,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.control = control
        self.admit = admit
        self.pass_ms = pass_ms or getattr(control, "pass_ms", None)
        self.prefill_rows = prefill_rows
        self.on_idle: Callable[[], None] | None = None  # called a second after work runs out
        self.waiting: list[BatchRequest] = []
        self.running: list[BatchRequest] = []
        self._lock = threading.Condition()
        self._stop = False
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # for `call`
        self._thread: int | None = None  # the thread in `run`
        self.last_batch = 0  # requests in the latest step's pass
        self.last_rows = 0  # rows in it
        # by method: the slowest recent draft (a draft model reading a prompt), decaying
        self.peak_ask_ms: dict[str, float] = {}
        # seconds the engine's thread spent, by phase (the server's /metrics shows them)
        self.phase_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    # ------------------------------------------------------------------ any thread
    def submit(self, request: BatchRequest) -> BatchRequest:
        with self._lock:
            self.waiting.append(request)
            self._lock.notify()
        return request

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the engine's thread between two steps: its result, or its
        exception raised here. Whatever may start torch's or the native kernels' OpenMP
        work (building a drafter, loading a draft model) belongs there: a team of OpenMP
        threads started from a second thread throttles the engine's own (measured: a
        server whose drafters were built on a worker thread decoded 1.5x slower, 9.8
        against 14.0 tok/s with a draft model). Inline when called from that thread, or
        while no thread is in `run`."""
        done: Future = Future()
        with self._lock:
            inline = self._thread is None or self._thread == threading.get_ident()
            if not inline:
                self._calls.append((fn, done))
                self._lock.notify()
        return fn() if inline else done.result()

    def _answer_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        if not calls:
            return
        t = time.perf_counter()
        for fn, done in calls:
            try:
                done.set_result(fn())
            except BaseException as e:  # the caller's to handle
                done.set_exception(e)
        self.phase_s["calls"] += time.perf_counter() - t

    def _timed(self, phase: str, t: float) -> float:
        """Adds the time since ``t`` to ``phase``; returns now."""
        now = time.perf_counter()
        self.phase_s[phase] += now - t
        return now

    def run(self) -> None:
        """Step until `stop`, sleeping while there is nothing to do."""
        self._thread = threading.get_ident()
        try:
            self._run_loop()
        finally:
            with self._lock:
                self._thread = None  # later calls run inline
            self._answer_calls()  # any made before: answered, not lost

    def _run_loop(self) -> None:
        tidied = True
        while True:
            self._answer_calls()
            with self._lock:
                while not self._stop and not self.waiting and not self.running and not self._calls:
                    # a quiet second after the last step (the callers have let go of the
                    # finished requests by then): tidy up once
                    if not self._lock.wait(timeout=1.0) and not tidied and self.on_idle:
                        tidied = True
                        self._lock.release()
                        try:
                            self.on_idle()
                        finally:
                            self._lock.acquire()
                if self._stop:
                    break
                if self._calls and not self.waiting and not self.running:
                    continue  # answer them first
            tidied = False
            self.step()
        for r in self.running + self.waiting:
            r.cancel()
        self._drop(self.running + self.waiting)
        self.running, self.waiting = [], []

    # ------------------------------------------------------------------ the engine's thread
    def step(self) -> int:
        """One pass over every running request (and the next parts of new prompts);
        returns how many requests it ran."""
        t = time.perf_counter()
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            self.waiting = [r for r in self.waiting if not r.cancelled]
            joining = []
            while self.waiting and len(self.running) + len(joining) < self.max_batch:
                if self.admit is not None and not self.admit(self.waiting[0]):
                    break
                joining.append(self.waiting.pop(0))
        if gone:
            self._drop(gone)
        self.running += joining
        gone = [r for r in self.running if r.cancelled]
        if gone:
            self._drop(gone)
        batch = [r for r in self.running if not r.cancelled]
        t = self._timed("join", t)
        if not batch:
            self.running = []
            return 0
        decoding = [r for r in batch if r.decoding.started]
        # prompts: their next parts, at most prefill_rows rows in all, in arrival order
        prefills: list[tuple[BatchRequest, Pass]] = []
        room = self.prefill_rows
        for r in batch:
            if r.decoding.started or (room is not None and room <= 0):
                continue
            try:
                # beside other requests (a batch where goodput control stops most drafting)
                # the drafter's prompt rows cost more than its first drafts earn
                p = r.decoding.prefill(room, prompt_rows=len(batch) == 1)
            except Exception as e:  # a drafter failed on the prompt: this request ends
                r.error = e
                continue
            prefills.append((r, p))
            room = None if room is None else room - len(p.tokens)
        t = self._timed("prompt", t)
        shared = len(decoding) + len(prefills) > 1
        caps: dict[int, int | None] = {}
        if self.control is not None and decoding:
            rates = [r.acceptance.rate for r in decoding]
            prompts = sum(len(p.tokens) for _, p in prefills)
            # a draft costs what this request's have cost, or what its method's slowest
            # recent one did: a drafter with a draft model now and then reads a whole
            # prompt (about a second for 700 tokens on the 0.5B), and the batch waits
            costs = [max(r.draft_ms, self.peak_ask_ms.get(r.method, 0.0)) for r in decoding]
            allocated = self.control.allocate(rates, prompts, costs)
            caps = dict(zip(map(id, decoding), allocated, strict=True))
        t = self._timed("control", t)
        passes: list[tuple[BatchRequest, Pass]] = []
        for r in decoding:
            r.decoding.clock, r.decoding.shared = r.clock, shared
            cap = caps.get(id(r))
            if r.max_nodes is not None:
                cap = r.max_nodes if cap is None else min(cap, r.max_nodes)
            try:
                asked = time.perf_counter()
                passes.append((r, r.decoding.propose(cap)))
            except Exception as e:  # a drafter failed: this request ends, the rest go on
                r.error = e
                continue
            if cap != 0:  # what asking the drafter cost (observe is timed apart)
                ms = (time.perf_counter() - asked) * 1e3
                r.draft_ms = ms if r.draft_ms == 0 else 0.8 * r.draft_ms + 0.2 * ms
                peak = 0.98 * self.peak_ask_ms.get(r.method, 0.0)
                self.peak_ask_ms[r.method] = max(peak, ms)
        passes += prefills
        t = self._timed("draft", t)
        try:
            outputs = self._run(passes)
        except Exception as e:  # the pass itself failed: every request in it ends
            for r, _ in passes:
                r.error = e
            outputs = [None] * len(passes)
        if len(passes) > 1 and self.pass_ms is not None:
            # on each request's clock the pass costs what its rows would alone
            wall = time.perf_counter() - t
            for r, p in passes:
                r.left_out_s += wall - self.pass_ms(len(p.tokens)) / 1e3
        t = self._timed("pass", t)
        self.last_batch, self.last_rows = len(passes), sum(len(p.tokens) for _, p in passes)
        for (r, _), out in zip(passes, outputs, strict=True):
            if r.error is not None:
                continue
            try:
                self._deliver(r, out)
            except Exception as e:
                r.error = e
        t = self._timed("verify", t)
        self._drop([r for r in batch if r.error is not None or r.decoding.done])
        self._timed("end", t)
        return len(passes)

    def _run(self, passes: list[tuple[BatchRequest, Pass]]) -> list:
        """Every pass's (logits, hidden): in one batched pass where they share the model."""
        batched = [
            (r, p)
            for r, p in passes
            if isinstance(r.decoding.target, NativeTarget)
            and self.model is not None
            and r.decoding.target.model is self.model
        ]
        out: dict[int, tuple] = {}
        if batched:
            layers = tuple(sorted({i for _, p in batched for i in p.hidden_layers}))
            segments = []
            for r, p in batched:
                cache = r.decoding.target.cache
                positions = p.positions
                if positions is None:
                    positions = list(range(cache.length, cache.length + len(p.tokens)))
                segments.append(Segment(p.tokens, positions, cache, p.attn_mask, p.logits_rows))
            results = self.model.forward_batch(segments, hidden_layers=layers or None)
            for (r, p), res in zip(batched, results, strict=True):
                if not layers:
                    out[id(r)] = (res, None)
                else:
                    logits, hidden = res
                    want = p.hidden_layers
                    out[id(r)] = (logits, layer_features(hidden, layers, want) if want else None)
        for r, p in passes:
            if id(r) not in out:
                out[id(r)] = run_pass(r.decoding.target, p)
        return [out[id(r)] for r, _ in passes]

    def _deliver(self, r: BatchRequest, out: tuple) -> None:
        d = r.decoding
        if not d.started:
            piece = d.start(*out)
            if d.started:  # the prompt's last part
                r.first_token_s = time.perf_counter() - r.submitted
        else:
            piece = d.verified(*out)
            if len(d.tree):
                r.acceptance.observe(max(d.tree.depths) + 1, len(d.outcome.path))
        if piece and r.on_text is not None:
            r.on_text(piece)

    def _drop(self, ended: list[BatchRequest]) -> None:
        for r in ended:
            if r in self.running:
                self.running.remove(r)
            try:
                r.decoding.close()
            except Exception as e:  # a drafter's finish failed: the request still ends
                r.error = r.error or e
            if r.on_end is not None:
                try:
                    r.on_end(r)
                except Exception:  # the listener is gone (a closed connection)
                    pass
            if r.release is not None:
                r.release()
            r.on_text = r.on_end = r.release = None  # the callers' closures: no cycles kept
            r.ended.set()
