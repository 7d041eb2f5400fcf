"""The OpenAI-compatible HTTP API over a `Service`: FastAPI routes, served by uvicorn.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as
server-sent events ending in ``data: [DONE]``, or one JSON response), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Errors are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx/5xx status: a client's
mistake never reaches a traceback, and the server keeps serving.

Beyond OpenAI's fields a request may carry ``method`` (a decoding method, default the
server's) with ``method_options`` (its options), and ``top_k``; each response carries
``speculation``: the method that ran, tokens drafted and accepted, target passes and
tokens per pass.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from specdec.errors import InvalidRequestError, SpecdecError
from specdec.serve.service import Job, OverloadedError, Service, TooLargeError
from specdec.speculation.sampling import SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status)


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def create_app(
    service: Service,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    default_max_tokens: int = 256,
    request_timeout_s: float = 600.0,
) -> FastAPI:
    app = FastAPI(title="specdec", docs_url=None, redoc_url=None, openapi_url=None)
    names = {model_name}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return ApiError(
                    401,
                    "invalid or missing API key",
                    "authentication_error",
                    code="invalid_api_key",
                ).response()
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return ApiError(
                413, f"request body over {max_body_bytes} bytes", "invalid_request_error"
            ).response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(
            service.metrics.render(service.gauges(), dict(service.engine.phase_s)),
            media_type="text/plain; version=0.0.4",
        )

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(service.metrics.started),
                    "owned_by": "specdec",
                }
            ],
        }

    async def read_body(request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():  # also when no length was announced
            raw += chunk
            if len(raw) > max_body_bytes:
                raise ApiError(
                    413, f"request body over {max_body_bytes} bytes", "invalid_request_error"
                )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in names:
            raise ApiError(
                404,
                f"model {model!r} is not served here (this server serves {model_name!r})",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_body(request)
        messages = _messages(body.get("messages"))
        try:
            ids = await asyncio.to_thread(service.gen.prompt_ids, messages)
        except SpecdecError as e:
            raise bad(str(e), "messages") from None
        return await _complete(request, body, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)  # token ids, as OpenAI allows
            if any(not 0 <= t < service.gen.vocab_size for t in ids):
                raise bad("prompt token ids must lie in the vocabulary", "prompt")
        elif isinstance(prompt, str):
            if not prompt:
                raise bad("empty prompt", "prompt")
            ids = await asyncio.to_thread(service.gen.tokenizer.encode, prompt)
        else:
            raise bad("prompt must be a string (or one string, or token ids)", "prompt")
        if body.get("echo"):
            raise bad("echo is not supported", "echo")
        return await _complete(request, body, ids, "text")

    async def _complete(request: Request, body: dict, ids: list[int], kind: str) -> Response:
        job = _job(body, ids, kind, default_max_tokens)
        stream = _flag(body, "stream")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        def on_end(r) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, None)

        try:
            req = await asyncio.to_thread(service.submit, job, on_text, on_end)
        except OverloadedError as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
        except TooLargeError as e:
            raise ApiError(
                400, str(e), "invalid_request_error", code="context_length_exceeded"
            ) from None
        except SpecdecError as e:
            raise bad(str(e)) from None
        created = int(time.time())
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + job.id
        deadline = loop.time() + request_timeout_s

        async def next_piece():
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            return await asyncio.wait_for(pieces.get(), timeout=left)

        if not stream:
            text = []
            try:
                while (piece := await next_piece()) is not None:
                    text.append(piece)
            except (TimeoutError, asyncio.CancelledError):
                req.cancel()
                raise ApiError(
                    504, f"the request took over {request_timeout_s:g} s", "timeout"
                ) from None
            if req.error is not None:
                raise ApiError(500, f"generation failed: {req.error}", "server_error")
            return JSONResponse(_response(rid, kind, created, model_name, req))

        async def events() -> AsyncIterator[str]:
            try:
                if kind == "chat":
                    yield _sse(
                        _chunk(rid, kind, created, model_name, {"role": "assistant", "content": ""})
                    )
                while True:
                    try:
                        piece = await next_piece()
                    except TimeoutError:
                        req.cancel()
                        err = {
                            "message": f"the request took over {request_timeout_s:g} s",
                            "type": "timeout",
                        }
                        yield _sse({"error": err})
                        break
                    if piece is None:
                        if req.error is not None:
                            err = {
                                "message": f"generation failed: {req.error}",
                                "type": "server_error",
                            }
                            yield _sse({"error": err})
                            break
                        reason = req.decoding.out.finish_reason or "length"
                        yield _sse(_chunk(rid, kind, created, model_name, None, reason))
                        if include_usage:
                            yield _sse(_usage_chunk(rid, kind, created, model_name, req))
                        break
                    yield _sse(_chunk(rid, kind, created, model_name, piece))
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slot
                req.cancel()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": rid},
        )

    return app


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false", name)
    return v


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or (integer and not isinstance(v, int))
    ):
        kind = "an integer" if integer else "a number"
        raise bad(f"{name} must be {kind}, got {json.dumps(v)[:40]}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(f"{name} must be {span}, got {v}", name)
    return v


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"messages[{i}]: only text content parts are supported", "messages")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise bad("every message is empty", "messages")
    return out


def _job(body: dict, ids: list[int], kind: str, default_max_tokens: int) -> Job:
    n = _number(body, "n", 1, 1, integer=True)
    if n != 1:
        raise bad("only n=1 is supported", "n")
    if body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", None, 1, integer=True)
    else:
        max_tokens = _number(body, "max_tokens", default_max_tokens, 1, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, 2)  # OpenAI's default
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise bad("top_p must be > 0", "top_p")
    top_k = _number(body, "top_k", 0, 0, integer=True)
    seed = _number(body, "seed", None, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad(
            f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop"
        )
    method = body.get("method")
    if method is not None and not isinstance(method, str):
        raise bad("method must be a string", "method")
    options = body.get("method_options") or {}
    if not isinstance(options, dict):
        raise bad("method_options must be an object", "method_options")
    try:
        sampling = SamplingParams(
            temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed
        )
    except InvalidRequestError as e:
        raise bad(str(e)) from None
    return Job(
        prompt_ids=ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(stop),
        method=method,
        options=dict(options),
        id=uuid.uuid4().hex[:24],
        kind=kind,
    )


def _speculation(req) -> dict:
    s = req.decoding.out.stats
    return {
        "method": req.method,
        "draft_tokens": s.drafted,
        "accepted_tokens": s.accepted,
        "target_passes": s.target_passes,
        "mean_accepted_length": round(s.tau, 4),
        "seconds": round(s.wall_s, 4),
    }


def _usage(req) -> dict:
    s = req.decoding.out.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.new_tokens,
        "total_tokens": s.prompt_tokens + s.new_tokens,
    }


def _response(rid: str, kind: str, created: int, model: str, req) -> dict:
    out = req.decoding.out
    reason = out.finish_reason or "length"
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "finish_reason": reason,
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(req),
        "speculation": _speculation(req),
    }


def _chunk(rid, kind, created, model, piece, finish_reason=None) -> dict:
    if kind == "chat":
        delta = piece if isinstance(piece, dict) else ({"content": piece} if piece else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def _usage_chunk(rid, kind, created, model, req) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(req),
        "speculation": _speculation(req),
    }


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
