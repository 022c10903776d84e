"""The OpenAI wire format: request bodies checked into `Params`, responses and stream chunks built.

Every problem with a request becomes an `ApiError`, answered as OpenAI answers it:
`{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from slm.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Params:
    prompt_text: str | None  # text to tokenize (None: prompt_ids given)
    prompt_ids: list[int] | None
    max_tokens: int | None  # None: up to the context
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _get(body: dict, name: str, types, default=None, check=None, want: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; JSON true is never a number here.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise ApiError(400, f"'{name}' must be {want}, got {value!r}", param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {want}, got {value!r}", param=name)
    return value


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


_UNSUPPORTED = {  # field -> the value we can honour (anything else is refused, not silently ignored)
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None, "functions": None,
}


def parse_common(body: dict) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, ok in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != ok and value not in ({}, []):
            raise ApiError(400, f"'{name}'={value!r} is not supported by this server (only {ok!r})", param=name)
    temperature = _get(body, "temperature", (int, float), 1.0, lambda t: math.isfinite(t) and 0 <= t <= 2,
                       "a number in [0, 2]")
    top_p = _get(body, "top_p", (int, float), None, lambda p: 0 < p <= 1, "a number in (0, 1]")
    top_k = _get(body, "top_k", int, None, lambda k: k >= 1 or k == -1, "an integer >= 1 (or -1: off)")
    seed = _get(body, "seed", int, None, lambda s: -(2**63) <= s < 2**63, "a 64-bit integer")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of up to 4 strings, got {stop!r}", param="stop")
    if any(s == "" for s in stop):
        raise ApiError(400, "'stop' strings must not be empty", param="stop")
    stream = _get(body, "stream", bool, False, want="a boolean")
    options = _get(body, "stream_options", dict, {}, want="an object")
    include_usage = _get(options, "include_usage", bool, False, want="a boolean")
    return dict(
        sampling=SamplingParams(temperature=float(temperature), top_p=top_p, top_k=None if top_k == -1 else top_k),
        seed=seed, stop=stop, stream=stream, include_usage=include_usage,
    )


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        if body.get(name) is not None:
            return _get(body, name, int, None, lambda n: n >= 1, "an integer >= 1")
    return default


def parse_completion(body: dict) -> Params:
    common = parse_common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    text = ids = None
    if isinstance(prompt, str) and prompt:
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
    else:
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                       param="prompt")
    return Params(text, ids, _max_tokens(body, ("max_tokens",), 16), **common)


def parse_chat(body: dict, render) -> Params:
    """render(messages) -> prompt text with the model's chat template."""
    common = parse_common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and 'content'",
                           param="messages")
        clean.append({"role": m["role"], "content": content})
    tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None)
    return Params(render(clean), None, tokens, **common)


# --- responses -------------------------------------------------------------------------------


class Shape:
    """The ids, names and nesting of one response, completion or chat."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, text: str, finish_reason: str, usage: dict, timings: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage=usage, timings=timings)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage=usage, timings=timings)

    def chunk(self, delta: str | None, finish_reason: str | None = None, first: bool = False, **extra) -> dict:
        if self.chat:
            d = {} if delta is None else {"content": delta}
            if first:
                d["role"] = "assistant"
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)
