"""The HTTP side: FastAPI routes in OpenAI's shapes, server-sent events, API key, /metrics, the page.

Handlers never touch the model: they check a request, tokenize it, hand it to the scheduler
thread and relay its events (token deltas with their provenance, then "done") to the client."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from slm.errors import SlmError
from slm.serve.metrics import Metrics
from slm.serve.protocol import ApiError, Params, Shape, parse_chat, parse_completion
from slm.serve.requests import Request
from slm.serve.scheduler import QueueFull, Scheduler

PAGE = Path(__file__).parent / "static" / "index.html"
OPEN_PATHS = ("/", "/health", "/v1/health")  # no API key needed, as llama-server's /health


@dataclass
class ServerState:
    name: str  # the model id clients see
    tokenizer: object
    vocab_size: int
    ctx: int
    stop_ids: frozenset[int]
    scheduler: Scheduler
    metrics: Metrics
    render_chat: object  # messages -> text, or None when the model has no chat template
    api_key: str | None = None
    draft: str | None = None


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="slm serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        if state.api_key is not None and request.url.path not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth.encode(), f"Bearer {state.api_key}".encode()):
                return _error(ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                       type="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        state.metrics.reject("queue_full" if e.status in (429, 503) else "invalid")
        return _error(e)

    @app.exception_handler(Exception)
    async def internal_error(_request, e: Exception):  # a bug: answer it, keep serving
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        if state.scheduler.error is not None or not state.scheduler.thread.is_alive():
            return _error(ApiError(503, "the decoding loop is not running", type="unavailable_error"))
        return {"status": "ok", "rows_in_use": state.scheduler.rows_in_use(),
                "waiting": len(state.scheduler.waiting), "draft": state.draft}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "slm",
                                            "max_model_len": state.ctx}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        params = parse_completion(await _json(request))
        return await _generate(state, params, Shape(False, state.name), request)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        if state.render_chat is None:
            raise ApiError(400, f"model {state.name} has no chat template; use /v1/completions", param="messages")
        params = parse_chat(await _json(request), state.render_chat)
        return await _generate(state, params, Shape(True, state.name), request)

    return app


async def _json(request: HttpRequest) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _make_request(state: ServerState, params: Params, emit) -> Request:
    tok = state.tokenizer
    ids = params.prompt_ids if params.prompt_ids is not None else tok.encode(params.prompt_text)
    bad = [t for t in ids if not 0 <= t < state.vocab_size]
    if bad:
        raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (size {state.vocab_size})",
                       param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
    room = state.ctx - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(ids)} tokens, but this server's context is {state.ctx}: "
                       "no room to generate", param="messages" if params.prompt_text is None else "prompt",
                       code="context_length_exceeded")
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    try:
        return Request(id=secrets.token_hex(8), prompt=list(ids), max_tokens=max_tokens, sampling=params.sampling,
                       tokenizer=tok, emit=emit, stop=params.stop, stop_ids=state.stop_ids, seed=params.seed)
    except SlmError as e:
        raise ApiError(400, str(e)) from None


async def _generate(state: ServerState, params: Params, shape: Shape, http: HttpRequest):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    req = _make_request(state, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    try:
        state.scheduler.submit(req)
    except QueueFull:
        raise ApiError(429, "the server is busy (its request queue is full); retry later", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    if params.stream:
        return StreamingResponse(_stream(state, req, shape, events, params.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return None
                continue
            if ev["type"] == "done":
                return shape.full(req.text, ev["finish_reason"], req.usage(), req.timings())
            if ev["type"] == "error":
                raise ApiError(500, ev["message"], type="server_error")
    finally:
        if not req.done:
            state.scheduler.cancel(req)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, req: Request, shape: Shape, events: asyncio.Queue, include_usage: bool):
    """SSE chunks: one per token (its text delta, and in `slm` the token id and whether it was a draft
    token the target accepted), then one with finish_reason and llama-server's `timings`, then usage
    (if asked), then [DONE]. A client that goes away cancels the request (the generator is closed)."""
    first = True
    started = time.perf_counter()
    try:
        while True:
            ev = await events.get()
            if ev["type"] == "token":
                elapsed = time.perf_counter() - started
                n = len(req.generated)
                live = {"token_ids": [ev["token"]], "drafted": [ev["drafted"]], "n": n,
                        "tokens_per_second": round(n / elapsed, 2) if elapsed > 0 else None,
                        "drafted_total": sum(req.drafted)}
                yield _sse(shape.chunk(ev["delta"], first=first, slm=live))
                first = False
            elif ev["type"] == "done":
                reason = ev["finish_reason"]
                tail = req.text[req.sent :]  # nothing held back is left once finished; defensive
                yield _sse(shape.chunk(tail, finish_reason=reason, first=first, timings=req.timings()))
                if include_usage:
                    yield _sse(shape.usage_chunk(req.usage()))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse(ApiError(500, ev["message"], type="server_error").body())
                return
    finally:
        if not req.done:
            state.scheduler.cancel(req)
