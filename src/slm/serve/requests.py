"""One generation request as the scheduler sees it: its tokens, its row, its text so far.

Text is released incrementally: never a trailing incomplete UTF-8 sequence (the decoder's
U+FFFD), and never the last len(longest stop string) - 1 characters while a stop string could
still be completing, so a client never sees part of a stop string."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slm.sampling import SamplingParams
from slm.serve.decoding import SpecCounts


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int  # already capped so that prompt + output fit the server's context
    sampling: SamplingParams
    tokenizer: object
    emit: Callable[[dict], None]  # thread-safe: hands an event to the HTTP side
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None

    generated: list[int] = field(default_factory=list)
    drafted: list[bool] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    cancelled: bool = False  # set by the HTTP side when the client went away
    row: int | None = None
    cached: int = 0  # positions of the context held in the row's KV cache
    reused: int = 0  # of the prompt's, taken over from the row's previous request (not computed)
    spec: SpecCounts = field(default_factory=lambda: SpecCounts(accepted_per_pos=[]))
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    text: str = ""
    sent: int = 0  # characters of `text` already released
    drafted_total: int = 0  # of `generated`, draft tokens the target accepted

    def __post_init__(self) -> None:
        # Per request, so that a seeded request draws the same numbers whatever else is running.
        self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None else
                                                       int(torch.randint(0, 2**62, ()).item()))

    @property
    def speculate(self) -> bool:
        """Seeded sampling is decoded without the draft (see `slm.serve.scheduler`) to stay reproducible."""
        return self.sampling.greedy or self.seed is None

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def push(self, token: int, from_draft: bool) -> float | None:
        """Record one new token, release the text it completes, decide whether the request is
        finished. -> seconds since the previous token (None for the first)."""
        now = time.perf_counter()
        gap = None if self.last_token_at is None else now - self.last_token_at
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.generated.append(token)
        self.drafted.append(from_draft)
        self.drafted_total += from_draft
        if token in self.stop_ids:
            self.finish_reason = "stop"
            visible = self.generated[:-1]
        else:
            visible = self.generated
        self.text = self.tokenizer.decode(visible)
        hold = 0
        if self.stop and self.finish_reason is None:
            start = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.finish_reason = self.text[: min(hits)], "stop"
            else:
                hold = max(map(len, self.stop)) - 1
        if self.finish_reason is None and len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None:
            end = max(self.sent, end - hold)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # wait for the rest of the character
                end -= 1
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        self.emit({"type": "token", "delta": delta, "token": token, "drafted": from_draft,
                   "n": len(self.generated), "drafted_total": self.drafted_total})
        return gap

    def timings(self) -> dict:
        """llama-server's per-response `timings` (prompt_* covers the wait and the first token)."""
        first = self.first_token_at or time.perf_counter()
        last = self.last_token_at or first
        n = len(self.generated)
        predicted_ms = (last - first) * 1000.0
        return {
            "prompt_n": len(self.prompt) - self.reused,
            "cache_n": self.reused,
            "prompt_ms": round((first - self.arrived) * 1000.0, 3),
            "predicted_n": n,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round((n - 1) / predicted_ms * 1000.0, 3) if n > 1 and predicted_ms > 0 else None,
            "draft_n": self.spec.draft_tokens,
            "draft_n_accepted": self.spec.accepted_tokens,
            "drafted_and_accepted_tokens": self.drafted_total,
        }

    def usage(self) -> dict:
        n = len(self.generated)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n,
                "prompt_tokens_details": {"cached_tokens": self.reused}}
