"""Continuous batching: one thread decodes every active request together over one static KV cache.

Each request holds one cache row while it runs. Between steps the scheduler admits waiting
requests into free rows and drops finished or cancelled ones, so requests join and leave the
running batch at any step. A step is either:

- one request alone (no one waiting): the library's single-request path runs it on its row
  (`Decoder.run_alone`), speculative when the server has a draft, until it finishes or someone
  waits to join (then it stops after its next token);
- two or more requests: one batched forward carries the prompts of requests joining now (their
  first token comes from it) and the pending token of every running row, each row at its own
  positions (`Decoder.step_rows`; without the native kernels, or for a prompt too long for them,
  joining prompts are prefilled first, one by one). While rows are running, the joining prompts
  add at most `prefill_chunk` tokens to a step (chunked prefill, as vLLM's and Sarathi-Serve's):
  a long prompt takes a few steps to join, and the running rows' inter-token latency stays bounded. With a draft, each greedy row also carries up
  to `BATCH_LOOKUP_K` prompt-lookup draft tokens (as many positions as `LookupGate` finds worth
  their rows), verified per row: a row keeps its accepted prefix plus the target's next token.

A new request computes only what no row's cache already holds of its prompt (a shared system
prompt, an earlier turn of the same chat): it takes the free row holding the longest prefix, or has
the longest prefix any row holds copied into its row (`Decoder.reused_prefix` says where that is
exact); `usage.prompt_tokens_details.cached_tokens` reports it.

So speculation runs with the server's full draft (model, lookup, adaptive K) while one request
runs, and as batched verification of per-row prompt-lookup drafts with two or more. Both give
each request exactly its single-request output: greedy is the target's argmax either way, and
sampling draws each token from the target's distribution with the request's own generator.
A sampled request with a `seed` is never speculated: rejection sampling draws a number of random
values that depends on the draft's proposals and on the adaptive K (which learns from every
request the server has seen), so only plain decoding (one draw per token, in either mode) makes
its output a function of its prompt, parameters and seed alone. Unseeded sampled requests are
speculated, and are distributed exactly as the target's own sampling.
"""

from __future__ import annotations

import collections
import threading

from slm.serve.decoding import Decoder, LookupGate, accept, pick
from slm.serve.metrics import Metrics
from slm.serve.requests import Request


# Prompt tokens the joining requests may add to one batched step while others decode (0: no limit):
# one native call's rows. Not less: at 4 chat clients (prompts of about 25 uncached tokens), chunks of
# 16 spread each join over more of the running rows' steps: inter-token p95 57 against 49 ms, same
# throughput (benchmarks/serve_ab.py, 5 rounds); the chunk bounds the stall a long prompt causes.
PREFILL_CHUNK = 32


class QueueFull(Exception):
    """The waiting queue is at its bound; the HTTP side answers 429 with Retry-After."""


class Scheduler:
    def __init__(self, decoder: Decoder, max_batch: int, max_queue: int, metrics: Metrics,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.decoder, self.metrics = decoder, metrics
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.rows: list[Request | None] = [None] * max_batch
        # held[r]: the tokens whose keys and values row r holds at positions 0.. while no request has it
        # (a finished request's context as far as it was cached), for the next request's prompt to reuse.
        self.held: list[list[int]] = [[] for _ in range(max_batch)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="slm-scheduler", daemon=True)
        self.gate = LookupGate()

    # --- called from the HTTP side -----------------------------------------------------

    def start(self) -> None:
        """Warm the decoder up (before the HTTP side answers, so no request waits for it), then decode."""
        self.decoder.warm_up()
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, req: Request) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(req)
            self.metrics.waiting = len(self.waiting)
            self.cond.notify_all()

    def cancel(self, req: Request) -> None:
        """The client went away: the request stops before its next token and frees its row."""
        with self.cond:
            req.cancelled = True
            self.cond.notify_all()

    def rows_in_use(self) -> int:
        return sum(r is not None for r in self.rows)

    # --- the scheduler thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    self._admit()
                    active = [r for r in self.rows if r is not None]
                    if self.closed:
                        break
                    if not active:
                        self.cond.wait(timeout=1.0)
                        continue
                    alone = len(active) == 1 and (not self.waiting or len(self.rows) == 1)
                if alone:
                    self._run_alone(active[0])
                else:
                    self._step(active)
        except BaseException as e:  # a bug, not a bad request: fail every request loudly
            self.error = e
            raise
        finally:
            with self.cond:
                for req in [r for r in self.rows if r is not None] + list(self.waiting):
                    req.emit({"type": "error", "message": f"the server's decoding loop stopped: {self.error!r}"})
                self.rows = [None] * len(self.rows)
                self.waiting.clear()

    def _admit(self) -> None:
        """(Lock held.) Free the rows of finished/cancelled requests, fill free rows from the queue."""
        for i, req in enumerate(self.rows):
            if req is not None and req.done:
                self._finish(req)
        while self.waiting and None in self.rows:
            req = self.waiting.popleft()
            if req.cancelled:
                self._finish(req)
                continue
            self._place(req)
        self.metrics.waiting = len(self.waiting)
        self.metrics.running = self.rows_in_use()

    def _place(self, req: Request) -> None:
        """(Lock held.) Give a request a free row and count as cached the longest prefix of its prompt
        that some row's cache holds: its own row's if that is longest (the free row holding the longest,
        else the one holding the least, so that the prefixes others keep stay), else copied from the
        row that has it (a running request's too: its context so far is in its row)."""
        def holds(r: int) -> list[int]:
            other = self.rows[r]
            return self.held[r] if other is None else other.context[: other.cached]

        reuse = [self.decoder.reused_prefix(holds(r), req.prompt) for r in range(len(self.rows))]
        free = [r for r, other in enumerate(self.rows) if other is None]
        req.row = max(free, key=lambda r: (reuse[r], -len(self.held[r]), -r))
        src = max(range(len(self.rows)), key=lambda r: (reuse[r], r == req.row))
        if reuse[src] > reuse[req.row]:
            self.decoder.copy_prefix(src, req.row, reuse[src])
        req.cached = req.reused = reuse[src]
        self.rows[req.row], self.held[req.row] = req, []  # the request writes the row from here on

    def _finish(self, req: Request) -> None:
        if req.row is not None and self.rows[req.row] is req:
            self.rows[req.row] = None
            self.held[req.row] = req.context[: req.cached] if self.decoder.exact_prefix(req.prompt) else []
        req.row = None
        reason = "cancelled" if req.cancelled else req.finish_reason
        self.metrics.finished(reason, len(req.prompt), req.reused)
        self.metrics.add_spec(req.spec.drafts, req.spec.draft_tokens, req.spec.accepted_tokens,
                              req.spec.accepted_per_pos)
        self.decoder.forget(req.id)
        req.emit({"type": "done", "finish_reason": reason})

    def _push(self, req: Request, token: int, from_draft: bool) -> None:
        gap = req.push(token, from_draft)
        self.metrics.token(gap, req.first_token_at - req.arrived if gap is None else None)

    def _run_alone(self, req: Request) -> None:
        self.metrics.steps["alone"] += 1
        context = req.context
        remaining = min(req.max_tokens - len(req.generated), self.decoder.ctx - len(context))

        def should_stop(_new) -> bool:
            # Another request waiting to join ends the solo run (after the token just emitted).
            return req.done or (bool(self.waiting) and len(self.rows) > 1)

        counts = self.decoder.run_alone(req.row, context, min(req.cached, len(context) - 1), remaining, req.sampling,
                                        req.stop_ids, req.generator, should_stop, lambda t, d: self._push(req, t, d),
                                        req.speculate)
        req.cached = len(req.context) - 1  # the library leaves the last token pending
        req.spec.drafts += counts.drafts
        req.spec.draft_tokens += counts.draft_tokens
        req.spec.accepted_tokens += counts.accepted_tokens
        for i, c in enumerate(counts.accepted_per_pos or []):
            if i == len(req.spec.accepted_per_pos):
                req.spec.accepted_per_pos.append(0)
            req.spec.accepted_per_pos[i] += c

    def _step(self, active: list[Request]) -> None:
        self.metrics.steps["batched"] += 1
        ragged = self.decoder.ragged
        joining, running = [], []
        for req in active:
            if req.done:
                continue
            context = req.context
            if not req.generated:
                # A new request: the rest of its prompt goes into the cache; its last position's logits
                # give its first token.
                if ragged and self.decoder.fits_step(len(context) - req.cached):
                    joining.append(req)  # prefilled inside this step's call (in chunks, see below)
                    continue
                logits = self.decoder.prefill_row(req.row, context[req.cached :], req.cached)
                req.cached = len(context)
                self._push(req, pick(logits, req.sampling, req.generator), False)
                if req.done:
                    continue
            running.append(req)
        k = self.gate.positions() if self.decoder.draft is not None and running else 0
        drafts = {}
        for req in running:
            context = req.context
            room = min(req.max_tokens - len(req.generated), self.decoder.ctx - len(context)) - 1
            drafts[req.row] = self.decoder.lookup(req.id, context, min(k, room)) if req.sampling.greedy else []
        # Chunked prefill: while rows are decoding, the joining prompts share at most `prefill_chunk` tokens
        # a step (oldest request first), so a joining prompt stretches one step of the running rows by
        # a bounded amount instead of by its whole length; and no more than the native call the running
        # rows start has room for (a second call would stream every weight again). A request whose turn
        # has not come sits the step out; a chunk that does not finish its prompt keeps no logits.
        budget = None
        if self.prefill_chunk and running:
            taken = sum(1 + len(d) for d in drafts.values())
            budget = min(self.prefill_chunk, -taken % self.decoder.call_rows or self.decoder.call_rows)
        chunks = []
        for req in sorted(joining, key=lambda r: r.arrived):
            left = len(req.context) - req.cached
            n = left if budget is None else min(budget, left)
            if n > 0:
                chunks.append((req, n))
                budget = None if budget is None else budget - n
        if not chunks and not running:
            return
        if ragged:
            segments = [(r.row, r.context[r.cached : r.cached + n], r.cached) for r, n in chunks]
            segments += [(r.row, [r.context[-1]] + drafts[r.row], len(r.context) - 1) for r in running]
            keep = [int(r.cached + n == len(r.context)) for r, n in chunks]
            out = self.decoder.step_rows(segments, keep + [len(drafts[r.row]) + 1 for r in running])
            for (req, n), logits in zip(chunks, out):
                req.cached += n
                if req.cached == len(req.context):  # the prompt's last chunk: its first token
                    self._push(req, pick(logits[-1], req.sampling, req.generator), False)
            logits_of = {r.row: x for r, x in zip(running, out[len(chunks) :])}  # row -> (K+1, V)
        else:
            n = max(req.row for req in running) + 1
            # Rows sitting this step out write past what their cache holds (see Decoder.decode_rows).
            starts = [min(len(self.held[r]) if self.rows[r] is None else self.rows[r].cached, self.decoder.ctx)
                      for r in range(n)]
            tokens = [[0]] * n
            for req in running:
                tokens[req.row], starts[req.row] = [req.context[-1]] + drafts[req.row], len(req.context) - 1
            logits = self.decoder.decode_rows(tokens, starts)  # (n, T, V)
            logits_of = {r.row: logits[r.row] for r in running}
        for req in running:
            d, logits = drafts[req.row], logits_of[req.row]
            if d:
                accepted, extra = accept(logits[: len(d) + 1], d)
                self.gate.record(len(d), accepted)
                req.spec.drafts += 1
                req.spec.draft_tokens += len(d)
                req.spec.accepted_tokens += accepted
                for i in range(accepted):
                    if i == len(req.spec.accepted_per_pos):
                        req.spec.accepted_per_pos.append(0)
                    req.spec.accepted_per_pos[i] += 1
                out = [(t, True) for t in d[:accepted]] + [(extra, False)]
            else:
                out = [(pick(logits[0], req.sampling, req.generator), False)]
            for token, from_draft in out:
                self._push(req, token, from_draft)
                if req.done:
                    break
            req.cached = len(req.context) - 1
