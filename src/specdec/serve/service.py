"""What the HTTP server runs: one loaded model, a batch engine on its own thread, a pool
of drafters, a memory budget and the server's metrics. Independent of HTTP, so that
it can be driven and tested directly.

- Each request gets its own KV cache over the shared model and its own drafter,
  checked out of a pool per (method, options) and given back when the request ends.
  The drafters of one (method, options) share their memory across requests
  (`Drafter.share_memory`: the n-gram cache's counts, Token Recycling's matrix,
  STAND's n-grams, REST's datastore, auto's statistics), so what one request teaches
  serves every request running beside it and after it; what belongs to one request
  (its place in its sequence, its tree) stays its drafter's own. Every drafter runs
  on the engine's thread, so the shared memory is never touched by two at once.
  A draft model's weights are shared; its cache is not.
- Memory: a request reserves the KV cache of its prompt plus its most new tokens
  (plus room for a draft tree) when it joins the batch; a request that does not fit
  the budget waits until others end, and one that could never fit is refused.
- Backends without batched passes (llama.cpp, transformers) serve one request at a
  time, in arrival order.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specdec.batching import BatchEngine, BatchRequest
from specdec.engine import Decoding
from specdec.errors import InvalidRequestError, SpecdecError
from specdec.models.target import NativeTarget
from specdec.serve.metrics import Metrics
from specdec.speculation.drafters.base import Drafter
from specdec.speculation.goodput import GoodputControl
from specdec.speculation.methods import get_method
from specdec.speculation.sampling import SamplingParams

log = logging.getLogger("specdec.serve")

# cache slots beyond prompt + new tokens, for a draft tree written before its cut; when
# memory is tight a request joins with less room and drafts smaller trees before it waits
TREE_ROOM = 64
MIN_TREE_ROOM = 8


class OverloadedError(SpecdecError):
    """The server cannot take the request now (its queue is full): retry later."""


class TooLargeError(InvalidRequestError):
    """The request could never fit the server's limits."""


@dataclass
class Job:
    """A request as the service sees it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    method: str | None = None  # None: the server's
    options: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    kind: str = "chat"


class DrafterPool:
    """Drafters per (method, options): one per running request, reused after it ends."""

    def __init__(self, gen) -> None:
        self.gen = gen
        self.idle: dict[tuple, list[Drafter]] = {}
        self.memory: dict[tuple, Drafter] = {}  # per key: the first drafter, whose memory all share
        self._lock = threading.Lock()

    def key(self, method: str, options: dict[str, Any]) -> tuple[str, tuple, dict[str, Any]]:
        """(the method run, the pool's key, its options resolved): checks method and
        options, raising InvalidRequestError for bad ones."""
        name, opts = self.gen.resolve(method, options)
        spec = get_method(name)
        return name, (name, repr(spec.effective_options(opts))), opts

    def take(self, resolved: tuple[str, tuple, dict[str, Any]]) -> tuple[tuple, Drafter, str]:
        """A drafter for ``resolved`` (what `key` gave): an idle one, or a new one sharing
        the memory of the first of its key."""
        name, key, opts = resolved
        with self._lock:
            if self.idle.get(key):
                return key, self.idle[key].pop(), name
            ctx = self.gen.build_context()
            # a draft model's weights are shared, its KV cache is the drafter's own
            load = ctx.load_draft

            def own_cache(spec, same_tokenizer=True, **kw):
                got = load(spec, same_tokenizer, **kw)
                if same_tokenizer:
                    return _own_cache(got)
                return _own_cache(got[0]), got[1]

            ctx = dataclasses.replace(ctx, load_draft=own_cache)
            drafter = get_method(name).build(ctx, opts)
            first = self.memory.setdefault(key, drafter)
            if first is not drafter:
                drafter.share_memory(first)
            return key, drafter, name

    def give(self, key: tuple, drafter: Drafter, keep: int = 16) -> None:
        """Back to the pool (at most ``keep`` idle ones per key: a burst's extras go)."""
        with self._lock:
            idle = self.idle.setdefault(key, [])
            if len(idle) < keep:
                idle.append(drafter)


def _own_cache(target):
    return NativeTarget(target.model) if type(target) is NativeTarget else target


class Service:
    """The model, its batch engine (on a thread of its own) and the server's state."""

    def __init__(
        self,
        gen,
        *,
        method: str = "auto",
        options: dict[str, Any] | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        max_memory_bytes: int | None = None,
        goodput: bool = True,
        background: bool = True,
    ) -> None:
        """``background``: the engine steps on a thread of its own; False leaves it to the
        caller to call `run` (on the main thread, the one whose OpenMP workers are warm:
        measured on 2 cores, the native kernels run ~2.5x slower per step from a second
        thread, whose OpenMP team is throttled beside the main thread's)."""
        self.gen = gen
        self.method, self.options = method, dict(options or {})
        self.pool = DrafterPool(gen)
        self.pool.key(method, self.options)  # a bad default method fails at start
        native = isinstance(gen.target, NativeTarget) and type(gen.target) is NativeTarget
        self.model = gen.target.model if native else None
        if not native:
            max_batch = 1  # one cache: one request at a time
        control = GoodputControl(gen.pass_cost()) if goodput and native else None
        self.engine = BatchEngine(
            self.model, max_batch=max_batch, control=control, admit=self._admit
        )
        self.max_queue = max_queue
        cfg = gen.target.config
        dtype_bytes = self.model.dtype.itemsize if self.model is not None else 4
        self.kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
        self.memory_budget = max_memory_bytes or _default_budget()
        self.reserved = 0
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self.engine.on_idle = _give_memory_back
        self._thread = None
        if background:
            self._thread = threading.Thread(
                target=self.engine.run, name="specdec-engine", daemon=True
            )
            self._thread.start()

    def run(self) -> None:
        """Step the engine on this thread until `close` (when not in the background)."""
        self.engine.run()

    @property
    def context(self) -> int:
        return self.gen.target.max_length

    def close(self) -> None:
        self.engine.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        job: Job,
        on_text: Callable[[str], None] | None,
        on_end: Callable[[BatchRequest], None],
    ) -> BatchRequest:
        """Check ``job`` and queue it; raises InvalidRequestError (the client's mistake),
        TooLargeError or OverloadedError. ``on_text``/``on_end`` are called from the
        engine's thread."""
        n = len(job.prompt_ids)  # an empty prompt or max_tokens < 1: Decoding refuses them
        if n >= self.context:
            raise TooLargeError(
                f"prompt of {n} tokens does not fit the context of {self.context} tokens"
            )
        max_tokens = min(job.max_tokens, self.context - n)
        need_min = (n + max_tokens + MIN_TREE_ROOM) * self.kv_bytes_per_token
        if need_min > self.memory_budget:
            raise TooLargeError(
                f"the request needs {need_min / 2**20:.0f} MiB of KV cache ({n} prompt tokens + "
                f"{max_tokens} new); the server's memory budget is "
                f"{self.memory_budget / 2**20:.0f} MiB: ask for fewer max_tokens"
            )
        if self.engine.queued >= self.max_queue:
            self.metrics.count("rejected", reason="queue_full")
            raise OverloadedError(
                f"the server's queue is full ({self.max_queue} requests waiting); retry later"
            )
        method = job.method or self.method
        options = self.options if job.method is None else job.options
        resolved = self.pool.key(method, options)  # a bad method or option: refused at once

        def make() -> tuple[tuple, Drafter, str, Any, Decoding]:
            key, drafter, name = self.pool.take(resolved)
            if self.model is not None:  # its cache is allocated when it joins, not now
                target = NativeTarget(self.model, capacity=0)
                target.cache.max_capacity = n + max_tokens + TREE_ROOM
            else:
                target = self.gen.target
            try:
                decoding = Decoding(
                    target,
                    self.gen.tokenizer,
                    job.prompt_ids,
                    max_new_tokens=max_tokens,
                    sampling=job.sampling,
                    stop=job.stop,
                    drafter=drafter,
                )
            except Exception:
                self.pool.give(key, drafter)
                raise
            return key, drafter, name, target, decoding

        # drafters are built on the engine's thread (`BatchEngine.call`: OpenMP work
        # started from this one would slow every step)
        key, drafter, name, target, decoding = self.engine.call(make)

        def release() -> None:
            self.pool.give(key, drafter, keep=self.engine.max_batch)
            if target is not self.gen.target:
                target.cache.release()  # now, not when the last reference goes
            with self._lock:
                self.reserved -= request.reserved
                request.reserved = 0

        request = BatchRequest(
            decoding,
            on_text=on_text,
            on_end=self._ended(job, name, on_end),
            release=release,
            need=n + max_tokens,  # slots, before the tree's room
            method=name,
        )
        self.metrics.count("requests_received")
        return self.engine.submit(request)

    def _admit(self, request: BatchRequest) -> bool:
        """Join the batch if its KV cache fits what the running requests left: with the
        full room for draft trees, else with less (smaller trees), else not yet."""
        per = self.kv_bytes_per_token
        with self._lock:
            free = (self.memory_budget - self.reserved) // per - request.need
            if free < MIN_TREE_ROOM:
                return False
            room = min(TREE_ROOM, free)
            request.reserved = (request.need + room) * per
            self.reserved += request.reserved
        request.max_nodes = room - 1  # the root takes a slot too
        target = request.decoding.target
        if target is not self.gen.target:
            target.cache.reserve(request.need + room)
        return True

    def _ended(self, job: Job, method: str, then: Callable[[BatchRequest], None]):
        def ended(request: BatchRequest) -> None:
            s = request.decoding.out.stats
            status = "error" if request.error else "cancelled" if request.cancelled else "ok"
            self.metrics.finished(request, status)
            log.info(
                "%s %s %s: %d prompt + %d new tokens, tau %.2f, %.2f s (%s)",
                job.id,
                job.kind,
                status,
                s.prompt_tokens,
                s.new_tokens,
                s.tau,
                time.perf_counter() - request.submitted,
                method,
            )
            then(request)

        return ended

    def gauges(self) -> dict[str, float]:
        return {
            "queue_length": self.engine.queued,
            "running_requests": len(self.engine.running),
            "batch_size": self.engine.last_batch,
            "batch_rows": self.engine.last_rows,
            "kv_reserved_bytes": self.reserved,
            "kv_budget_bytes": self.memory_budget,
        }


def _give_memory_back() -> None:
    """When the server falls idle: freed KV caches back to the system (glibc keeps freed
    blocks of a few MB in its heap otherwise, and the process stays at its peak)."""
    import gc

    gc.collect()  # what only the cycle collector would free
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _default_budget() -> int:
    """Three quarters of the memory available now (the model is loaded already)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 3 // 4
    except OSError:
        pass
    return 4 << 30
