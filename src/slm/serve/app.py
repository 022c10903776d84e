"""The HTTP side: FastAPI routes in OpenAI's shapes, server-sent events, API key, /metrics, the page.

Handlers never touch the model: they check a request, tokenize it, hand it to the scheduler
thread and relay its events (token deltas with their provenance, then "done") to the client."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import weakref
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


class BearerKey:
    """With --api-key: answers 401 to a request outside OPEN_PATHS without `Authorization: Bearer KEY`.
    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, which would relay every streamed chunk
    through a stream and a task of its own (work on the cores that decode)."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(auth, self.want):
                await _error(ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                      type="authentication_error", code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Outbox:
    """The scheduler thread's events into the event loop's queues, with one wake-up of the loop for all
    the events that arrive before it runs (a batched step's tokens, a speculative round's), not one per
    token: each wake-up writes to the loop's self-pipe and runs the loop, on cores the decoding uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        # A weak reference: _OUTBOXES maps the loop to this Outbox, whose entry must not keep the loop alive.
        self.loop, self.lock, self.items, self.armed = weakref.ref(loop), threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, event: dict) -> None:  # any thread
        with self.lock:
            self.items.append((queue, event))
            if self.armed:
                return
            self.armed = True
        loop = self.loop()
        if loop is not None and not loop.is_closed():  # else the server is gone, and its requests with it
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the loop's thread
        with self.lock:
            items, self.items, self.armed = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


_OUTBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Outbox


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="slm serve", docs_url=None, redoc_url=None, openapi_url=None)
    if state.api_key is not None:
        app.add_middleware(BearerKey, key=state.api_key)

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
    outbox = _OUTBOXES.get(loop) or _OUTBOXES.setdefault(loop, Outbox(loop))
    events: asyncio.Queue = asyncio.Queue()
    req = _make_request(state, params, lambda ev: outbox.put(events, ev))
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
    (if asked), then [DONE]. The chunks of the events that are ready together (a step's, a speculative
    round's) go out in one write. A client that goes away cancels the request (the generator is closed)."""
    first = True
    started = time.perf_counter()
    try:
        while True:
            ready = [await events.get()]
            while not events.empty():
                ready.append(events.get_nowait())
            out = []
            for ev in ready:
                if ev["type"] == "token":
                    elapsed = time.perf_counter() - started
                    live = {"token_ids": [ev["token"]], "drafted": [ev["drafted"]], "n": ev["n"],
                            "tokens_per_second": round(ev["n"] / elapsed, 2) if elapsed > 0 else None,
                            "drafted_total": ev["drafted_total"]}
                    out.append(_sse(shape.chunk(ev["delta"], first=first, slm=live)))
                    first = False
                elif ev["type"] == "done":
                    tail = req.text[req.sent :]  # nothing held back is left once finished; defensive
                    out.append(_sse(shape.chunk(tail, finish_reason=ev["finish_reason"], first=first,
                                                timings=req.timings())))
                    if include_usage:
                        out.append(_sse(shape.usage_chunk(req.usage())))
                    yield "".join(out) + "data: [DONE]\n\n"
                    return
                else:
                    yield "".join(out) + _sse(ApiError(500, ev["message"], type="server_error").body())
                    return
            yield "".join(out)
    finally:
        if not req.done:
            state.scheduler.cancel(req)
