"""Every call the server makes into slm's decoding library, in one place.

The scheduler (`slm.serve.scheduler`) owns one static KV cache of `max_batch` rows; each request
holds one row. Two ways to advance requests, both exact:

- `run_alone`: while exactly one request is active, it is decoded by the library's own
  single-request path on its row (`slm.generate.generate`, with the server's draft if it has one),
  so its output is the one `slm generate` gives. The library is told how much of the context the
  row already caches (`cached`), so a request that comes back from batched steps is not scored
  again (a draft with a cache of its own catches up by itself), and it stops, via `Stop.interrupt`,
  as soon as another request is waiting to join.
- `step_rows`: with two or more requests, one ragged native call per step (`NativeDecoder.segments`)
  carries every running row's pending token (and drafts) and the prompts of requests joining now,
  each at its own cache row and positions; rows without a request are not computed. With a draft,
  greedy rows also carry up to `BATCH_LOOKUP_K` prompt-lookup draft tokens (`lookup`), verified per
  row (`accept`, the library's `verify_greedy`): batched verification, per-row acceptance. Where the
  kernels do not run (no compiler, forward hooks) or a prompt is too long for them, `prefill_row` +
  `decode_rows` do the same through the model (`Transformer.forward` with input_pos of shape (B, T)).

A row's cache outlives its request: a new request whose prompt starts like the tokens a row holds
(a free row's last request, or a running request's context so far) reuses them (`reused_prefix`;
from another row than its own by `copy_prefix`), as llama-server's prompt cache and vLLM's prefix
caching do. Only where that is exact by construction: the kernels compute a position's keys and values the
same way whatever else is in the call (batch invariance), so a prefix they computed for one request
is bit for bit what they would compute for the next; prompts the model's own forward prefills (longer
than `PREFILL_ROWS`, or no kernels) never reuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slm.generate import Stop, generate
from slm.model import KVCache, Transformer
from slm.native import decoder
from slm.native.engine import MAX_ROWS, PREFILL_ROWS, NativeDecoder
from slm.sampling import SamplingParams, next_token
from slm.speculative import AdaptiveK, Draft, NgramDraft, Plan, verify_greedy

GREEDY = SamplingParams()
# Draft tokens per row in a batched step (prompt lookup after a match of 2+ tokens, greedy rows),
# at most; `LookupGate` decides how many positions are worth their rows.
BATCH_LOOKUP_K = 4


class LookupGate:
    """How many prompt-lookup tokens the rows of a batched step draft: position i only while the
    server's recent acceptance at position i is at least MIN_RATE (and every PROBE_EVERY steps all
    BATCH_LOOKUP_K, to keep measuring). Why: each drafted token is one more row in the batched
    forward, and with several requests the step is no longer bound by streaming the weights alone,
    so a row is not free. Measured with benchmarks/serve.py at 4 clients on chat prompts: lookup
    drafts were accepted 23% of the time (43% at the first position), and drafting every match
    made the server slower than no draft at all (65.6 against 86.4 tokens/s)."""

    MIN_RATE = 0.5
    DECAY = 0.98  # weight of the past per drafted token: the rate follows the last ~50 drafts
    PROBE_EVERY = 16

    def __init__(self, k: int = BATCH_LOOKUP_K):
        self.tried = [2.0] * k  # a prior of 1 accepted in 2: drafting starts open
        self.taken = [1.0] * k
        self.steps = 0

    def positions(self) -> int:
        """Draft tokens allowed per row in the next batched step."""
        self.steps += 1
        if self.steps % self.PROBE_EVERY == 0:
            return len(self.tried)
        n = 0
        while n < len(self.tried) and self.taken[n] >= self.MIN_RATE * self.tried[n]:
            n += 1
        return n

    def record(self, drafted: int, accepted: int) -> None:
        for i in range(drafted):
            self.tried[i] = self.tried[i] * self.DECAY + 1.0
            self.taken[i] = self.taken[i] * self.DECAY + (1.0 if i < accepted else 0.0)


class RowCaches:
    """Views into the model's batched KV cache: one row, or the first n rows, as batch-1 / batch-n caches."""

    def __init__(self, model: Transformer, max_batch: int, ctx: int):
        # One spare position past the context: rows that sit out a batched step write there.
        model.setup_cache(batch_size=max_batch, max_seq_len=ctx + 1)
        full: list[KVCache] = [layer.attention.kv_cache for layer in model.layers]
        self.model = model
        self.row = [[c.rows(r, r + 1) for c in full] for r in range(max_batch)]
        self.prefix = [None] + [[c.rows(0, n) for c in full] for n in range(1, max_batch + 1)]

    def bind(self, caches: list[KVCache]) -> None:
        for layer, cache in zip(self.model.layers, caches):
            layer.attention.kv_cache = cache


@dataclass
class SpecCounts:
    """Speculation counters of one run (vLLM/llama.cpp's spec_decode metrics)."""

    drafts: int = 0  # verify rounds that drafted at least one token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] | None = None  # [i]: rounds whose draft token i was accepted


class Decoder:
    """The model, its row caches, and the optional draft; `draft_tokens` as `slm generate --draft-tokens`."""

    def __init__(self, model: Transformer, max_batch: int, ctx: int, draft: Draft | None = None,
                 draft_tokens: int | str = "auto"):
        self.model, self.ctx = model, ctx
        self.caches = RowCaches(model, max_batch, ctx)
        self.run = decoder(model)  # the batched steps run on the same kernels as `generate`
        self.draft = draft
        self.draft_tokens = draft_tokens
        self.device = model.tok_embeddings.weight.device
        self.lookups: dict[str, NgramDraft] = {}

    @torch.inference_mode()
    def run_alone(self, row: int, context: list[int], cached: int, max_new: int, sampling: SamplingParams,
                  stop_ids, generator: torch.Generator, should_stop: Callable[[list[int]], bool],
                  on_token: Callable[[int, bool], None], speculate: bool = True) -> SpecCounts:
        """Decode one request on its row with the library's single-request path until it finishes or
        `should_stop` says so (with the draft if there is one and `speculate`). The row caches
        context[:cached] before; afterwards it caches context[:-1] (the last token is pending)."""
        self.caches.bind(self.caches.row[row])
        result = generate(
            self.model, context, max_new, sampling, draft=self.draft if speculate else None,
            draft_tokens=self.draft_tokens, stop=Stop(ids=tuple(sorted(stop_ids)), interrupt=should_stop),
            on_token=on_token, generator=generator, cached=cached,
        )
        s = result.stats
        return SpecCounts(len(s["accepted_per_round"]), s["draft_n"], s["draft_n_accepted"], s["accepted_per_pos"])

    def warm_up(self, tokens: int = 12) -> None:
        """Run both kinds of step once before serving: the first calls pay one-off costs (building the
        draft's kernels' weight copies, first touches of memory) that would land on the first requests,
        and the draft's adaptive schedule, timing them as draft steps, would judge the draft too slow
        (measured: a server whose first requests were not speculated at all). The schedule then
        starts afresh. Leaves every row free (its cache contents are overwritten by later prefills)."""
        n = max(1, min(8, self.ctx // 4))
        prompt = [i % self.model.config.vocab_size for i in range(1, n + 1)]
        self.run_alone(0, prompt, 0, max(1, min(tokens, self.ctx - n - 1)), GREEDY, (), torch.Generator(),
                       lambda _: False, lambda t, d: None)
        rows = min(2, len(self.caches.row))
        self.prefill_row(rows - 1, prompt, 0)
        self.decode_rows([[1]] * rows, [n] * rows)
        if self.draft is not None:
            self.draft.auto_schedule = AdaptiveK()

    @torch.inference_mode()
    def prefill_row(self, row: int, tokens: list[int], start: int) -> torch.Tensor:
        """Write tokens at positions start.. of one row -> the last position's logits (V,)."""
        self.caches.bind(self.caches.row[row])
        ids = torch.tensor(tokens, device=self.device).view(1, -1)  # (1, T)
        pos = torch.arange(start, start + len(tokens), device=self.device)  # (T,)
        return self.run(ids, pos, logits_to_keep=1)[0, -1]

    @property
    def native(self) -> bool:
        """Whether the kernels compute this server's steps (short prefills included) now."""
        return isinstance(self.run, NativeDecoder) and self.run.runs_natively

    @property
    def ragged(self) -> bool:
        """Whether batched steps can be one ragged native call (`step_rows`)."""
        return isinstance(self.run, NativeDecoder) and self.run.runs_segments

    def exact_prefix(self, prompt: list[int]) -> bool:
        """Whether the keys and values of a request with this prompt are all the kernels' (its prefill is
        short enough for them), so that another request may reuse them, and it those of another."""
        return self.native and len(prompt) <= PREFILL_ROWS

    def reused_prefix(self, held: list[int], prompt: list[int]) -> int:
        """How many of a row's cached positions (it holds the keys and values of `held`, left by a request
        for which `exact_prefix` held) a request with this prompt may take over instead of computing
        them: their common prefix, up to all but the prompt's last token (whose logits give the first
        new token), where that is exact (see above)."""
        if not self.exact_prefix(prompt):
            return 0
        n = 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            n += 1
        return n

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the keys and values of positions 0..n-1 from cache row src to row dst (bit for bit)."""
        for cache in self.caches.prefix[-1]:
            for t in (cache.k, cache.v):  # (B, Hkv, S, hd)
                t[dst, :, :n] = t[src, :, :n]

    @property
    def call_rows(self) -> int:
        """Rows (positions) one native call computes: a ragged step of more runs as several calls, each
        streaming all the weights."""
        return MAX_ROWS

    def fits_step(self, tokens: int) -> bool:
        """Whether a prompt of this many uncached tokens may be prefilled inside a ragged step."""
        return tokens <= PREFILL_ROWS

    @torch.inference_mode()
    def step_rows(self, segments: list[tuple[int, list[int], int]], keep: list[int]) -> list[torch.Tensor]:
        """One ragged step (only when `ragged`): segment i = (cache row, tokens, first position) ->
        the logits of its last keep[i] positions, (keep[i], V)."""
        self.caches.bind(self.caches.prefix[-1])  # every row: the kernels index the cache by row
        return self.run.segments(segments, keep)

    @torch.inference_mode()
    def decode_rows(self, tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """One forward for rows 0..n-1: row r's tokens (its pending token, then any draft tokens) at
        positions starts[r].. -> logits (n, T, V), T the longest row. A shorter row's padding goes to
        the positions after its tokens: nothing reads a position before a later forward writes it.
        A row without a live request passes [any token] at a position past what its cache holds (so
        a prefix it keeps for reuse stays intact), or at the spare position ctx."""
        n, T = len(tokens), max(map(len, tokens))
        ids = torch.zeros(n, T, dtype=torch.long)  # (n, T)
        pos = torch.empty(n, T, dtype=torch.long)  # (n, T)
        for r, (toks, start) in enumerate(zip(tokens, starts)):
            ids[r, : len(toks)] = torch.tensor(toks)
            pos[r] = torch.arange(start, start + T).clamp_(max=self.ctx)  # the spare position takes overflow
        self.caches.bind(self.caches.prefix[n])
        return self.run(ids.to(self.device), pos.to(self.device))  # (n, T, V)

    def lookup(self, key: str, context: list[int], k: int) -> list[int]:
        """Up to k prompt-lookup draft tokens for one row of a batched step (each request keeps its
        own n-gram index: `forget(key)` when it ends). Only when the server has a draft."""
        if self.draft is None or k <= 0:
            return []
        ngram = self.lookups.setdefault(key, NgramDraft(min_ngram=2))
        offers = ngram.offers(context)
        return ngram.propose(context, Plan(offers[0], k), GREEDY).tokens if offers else []

    def forget(self, key: str) -> None:
        self.lookups.pop(key, None)


def pick(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row's logits (V,), as the library's single-request decoding picks it."""
    return int(next_token(logits, sampling, generator))


def accept(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """Greedy verification of one row: logits (K+1, V) at [pending, d_1..d_K] -> (accepted, next token)."""
    return verify_greedy(logits, drafts)
