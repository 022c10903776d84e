"""Server counters in Prometheus' text format, under the names vLLM and llama.cpp use (`slm:` prefix).

Speculation: `slm:spec_decode_num_drafts_total` (verify rounds that drafted),
`..._num_draft_tokens_total`, `..._num_accepted_tokens_total` and
`..._num_accepted_tokens_per_pos_total{position="i"}` (rounds whose i-th draft token was
accepted). Acceptance rate = accepted/draft tokens; mean acceptance length (bonus token
included, as vLLM and llama.cpp define it) = 1 + accepted/drafts.
"""

from __future__ import annotations

import bisect
import threading

# Seconds; vLLM's buckets for time-to-first-token and inter-token latency, trimmed.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Updated by the scheduler thread and the HTTP handlers; read by GET /metrics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {"stop": 0, "length": 0, "cancelled": 0}
        self.rejected = {"invalid": 0, "queue_full": 0}
        self.prompt_tokens = self.prompt_tokens_cached = self.generation_tokens = 0
        self.drafts = self.draft_tokens = self.accepted_tokens = 0
        self.accepted_per_pos: list[int] = []
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.running = self.waiting = 0
        self.steps = {"alone": 0, "batched": 0}

    def add_spec(self, drafts: int, draft_tokens: int, accepted: int, per_pos: list[int]) -> None:
        with self.lock:
            self.drafts += drafts
            self.draft_tokens += draft_tokens
            self.accepted_tokens += accepted
            for i, c in enumerate(per_pos):
                if i == len(self.accepted_per_pos):
                    self.accepted_per_pos.append(0)
                self.accepted_per_pos[i] += c

    def token(self, gap: float | None, ttft: float | None) -> None:
        with self.lock:
            self.generation_tokens += 1
            if gap is not None:
                self.itl.observe(gap)
            if ttft is not None:
                self.ttft.observe(ttft)

    def finished(self, reason: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        with self.lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.prompt_tokens_cached += cached_tokens

    def reject(self, why: str) -> None:
        with self.lock:
            self.rejected[why] = self.rejected.get(why, 0) + 1

    def render(self) -> str:
        p = "slm:"
        with self.lock:
            lines = [
                f"# TYPE {p}num_requests_running gauge", f"{p}num_requests_running {self.running}",
                f"# TYPE {p}num_requests_waiting gauge", f"{p}num_requests_waiting {self.waiting}",
                f"# TYPE {p}request_success_total counter",
                *(f'{p}request_success_total{{finished_reason="{k}"}} {v}' for k, v in self.requests.items()),
                f"# TYPE {p}request_rejected_total counter",
                *(f'{p}request_rejected_total{{reason="{k}"}} {v}' for k, v in self.rejected.items()),
                f"# TYPE {p}prompt_tokens_total counter", f"{p}prompt_tokens_total {self.prompt_tokens}",
                # vLLM's prefix-cache counters, in tokens: prompt tokens looked up, and found in a row's cache
                f"# TYPE {p}prefix_cache_queries_total counter", f"{p}prefix_cache_queries_total {self.prompt_tokens}",
                f"# TYPE {p}prefix_cache_hits_total counter", f"{p}prefix_cache_hits_total {self.prompt_tokens_cached}",
                f"# TYPE {p}generation_tokens_total counter", f"{p}generation_tokens_total {self.generation_tokens}",
                f"# TYPE {p}decode_steps_total counter",
                *(f'{p}decode_steps_total{{mode="{k}"}} {v}' for k, v in self.steps.items()),
                f"# TYPE {p}spec_decode_num_drafts_total counter", f"{p}spec_decode_num_drafts_total {self.drafts}",
                f"# TYPE {p}spec_decode_num_draft_tokens_total counter",
                f"{p}spec_decode_num_draft_tokens_total {self.draft_tokens}",
                f"# TYPE {p}spec_decode_num_accepted_tokens_total counter",
                f"{p}spec_decode_num_accepted_tokens_total {self.accepted_tokens}",
                f"# TYPE {p}spec_decode_num_accepted_tokens_per_pos_total counter",
                *(f'{p}spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}} {c}'
                  for i, c in enumerate(self.accepted_per_pos)),
                f"# TYPE {p}time_to_first_token_seconds histogram", *self.ttft.lines(f"{p}time_to_first_token_seconds"),
                f"# TYPE {p}inter_token_latency_seconds histogram", *self.itl.lines(f"{p}inter_token_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"
