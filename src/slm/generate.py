"""Decoding: the one entry point, plain or speculative.

`generate(model, prompt, max_new_tokens, sampling, draft=...)` is what the CLI, HumanEval, the
demo and the benchmarks call. Plain decoding is the case without a draft: every round then
scores the one pending token. With a draft, each round follows the protocol of
`slm.speculative.schedule` (the draft offers, the schedule plans K, the draft proposes, the
target verifies all proposals in one forward, the schedule records the round); the invariant and
the acceptance rules are in `slm.speculative.verify`.

The model and the draft may each be an slm `Transformer` or a `transformers` causal LM (see
`slm.speculative.lm`); an slm model decodes with packed weights (`slm.pack`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from slm.errors import SlmError
from slm.sampling import SamplingParams, next_token
from slm.speculative.drafts import NOTHING, Draft, as_draft
from slm.speculative.lm import CachedLM, SlmLM, as_lm, eos_id
from slm.speculative.schedule import NO_DRAFT, FixedK, Round, check_draft_tokens, schedule_for
from slm.speculative.verify import verify_round


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens only (a stop token, if hit, is included)
    prompt_tokens: int
    seconds: float  # wall time of prefill + decode
    prefill_seconds: float
    stop_reason: str  # "eos" (a stop id), "stop" (a stop string), "length" (max_new_tokens), "context" (model full)
    stats: dict = field(default_factory=dict)  # counters of the rounds, see `generate`

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Stop:
    """When generation ends before its budget: at a stop token id (kept in the output, reason
    "eos"), or once the new text holds a stop string (reason "stop"), the `occurrences`-th one
    counted (2: the closing fence of a ``` code block). Strings need the tokenizer to decode.
    `interrupt`, if given, is asked after each token too: the caller's own reason to end early
    (a server making room for a waiting request, a client that left), reason "stop"."""

    ids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()
    tokenizer: object = None
    occurrences: int = 1
    interrupt: Callable[[list[int]], bool] | None = None
    # A string the newest token completes lies within the last few tokens: decode only those
    # (when one occurrence ends it; counting needs the whole text).
    window: int = 16

    def __post_init__(self) -> None:
        if self.strings and self.tokenizer is None:
            raise SlmError("stop strings need the tokenizer to decode the new tokens")
        if self.occurrences < 1:
            raise SlmError(f"stop occurrences must be >= 1, got {self.occurrences}")

    def reason(self, new: list[int]) -> str | None:
        """"eos", "stop" or None for the new tokens so far (checked after each token)."""
        if new[-1] in self.ids:
            return "eos"
        if self.interrupt is not None and self.interrupt(new):
            return "stop"
        if not self.strings:
            return None
        if self.occurrences == 1:
            tail = self.tokenizer.decode(new[-self.window :])
            return "stop" if any(s in tail for s in self.strings) else None
        text = self.tokenizer.decode(new)
        return "stop" if sum(text.count(s) for s in self.strings) >= self.occurrences else None


def stop_ids_for(model, tokenizer=None) -> tuple[int, ...]:
    """The ids that end a generation: the model's EOS and the tokenizer's, if they differ."""
    ids = {eos_id(model), getattr(tokenizer, "eos_id", None)}
    return tuple(sorted(i for i in ids if i is not None))


def check_request(lm: CachedLM, prompt: Sequence[int], max_new_tokens: int) -> None:
    """One-line errors for a request the model cannot serve."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SlmError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
    n, ctx = len(prompt), lm.max_seq_len
    if n == 0:
        raise SlmError("the prompt is empty (0 tokens)")
    if n >= ctx:
        raise SlmError(f"the prompt has {n} tokens, but the model's context is {ctx}: no room to generate")
    bad = [t for t in prompt if not 0 <= t < lm.vocab_size]
    if bad:
        raise SlmError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {lm.vocab_size})")


@torch.inference_mode()
def generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    *,
    draft=None,
    draft_tokens: int | str = "auto",
    stop: Stop | None = None,
    on_token: Callable[[int, bool], None] | None = None,
    generator: torch.Generator | None = None,
    cached: int = 0,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` (batch 1).

    model: an slm Transformer, a transformers causal LM, or a CachedLM.
    draft: None (plain decoding), a Draft (`slm.load.load_draft`), or a model as for `model`.
        Greedy output is the model's own; sampled output is distributed exactly as its own.
    draft_tokens: K tokens drafted per round, or "auto" (the draft's AdaptiveK).
    stop: what ends generation early (default: the model's EOS id).
    on_token: called as on_token(token_id, from_draft) for every new token as soon as it exists;
        from_draft is True iff the draft proposed it and the model accepted it.
    cached: how many leading prompt tokens an earlier call on this sequence already left in the
        model's KV cache (an slm Transformer's cache persists between calls): they are not scored
        again. A server resuming a request on its cache row passes it; 0 (the default) scores all.
    stats: rounds (target forwards after the prefill, which gives the first token), draft_n
        (tokens drafted), draft_n_accepted, accepted_per_pos (how often the i-th drafted token of
        a round was accepted), accepted_per_round (in each round that drafted), acceptance_rate
        (draft_n_accepted / draft_n, AMD's definition), mean_accepted (per round),
        tokens_per_round, mean_k, draft_forwards, draft_seconds, verify_seconds, tokens_per_second.
    """
    target = as_lm(model)
    prompt = list(prompt)
    check_request(target, prompt, max_new_tokens)
    check_draft_tokens(draft_tokens)
    source: Draft | None = None
    schedule = FixedK(0)
    if draft is not None:
        source = as_draft(draft, target.vocab_size)
        source.check_target(target)
        schedule = schedule_for(source, draft_tokens)
    if stop is None:
        stop = Stop(ids=() if target.eos_id is None else (target.eos_id,))
    budget = min(max_new_tokens, target.max_seq_len - len(prompt))
    reason = "length" if budget == max_new_tokens else "context"

    if isinstance(cached, bool) or not isinstance(cached, int) or not 0 <= cached < len(prompt):
        raise SlmError(f"cached must be an int in [0, {len(prompt) - 1}] (prompt tokens already in the cache), "
                       f"got {cached!r}")
    if cached and not (isinstance(target, SlmLM) and target.model.cache_len >= len(prompt) + budget):
        raise SlmError("cached > 0 needs an slm Transformer whose KV cache already holds the whole sequence "
                       "(it persists between calls; a larger one would be allocated empty)")

    t0 = time.perf_counter()
    target.prepare(len(prompt) + budget)
    if source is not None:
        source.reset(len(prompt) + budget)
    new: list[int] = []

    def emit(tokens: list[int], drafted: int) -> str | None:
        """Append a round's tokens (the first `drafted` of them from the draft); why it stops, if it does."""
        for i, tok in enumerate(tokens):
            new.append(tok)
            if on_token is not None:
                on_token(tok, i < drafted)
            why = stop.reason(new)
            if why is not None:
                return why
        return None

    # The prefill scores the whole prompt, so its last logits give the first new token; then the
    # round invariant holds (that token pending, everything before it cached).
    why = None
    if budget > 0:
        logits = target.forward(prompt[cached:], cached, last_only=True)  # (1, V)
        why = emit([int(next_token(logits[-1], sampling, generator))], 0)
    from_prefill = len(new)
    prefill_s = time.perf_counter() - t0

    context = prompt + new
    rounds = draft_forwards = drafted_total = accepted_total = 0
    draft_s = verify_s = 0.0
    accepted_per_round: list[int] = []  # rounds that drafted: accepted draft tokens in each
    accepted_per_pos: list[int] = []
    while why is None and len(new) < budget:
        n = len(context)
        plan, proposal = NO_DRAFT, NOTHING
        t1 = time.perf_counter()
        if source is not None:
            # K+1 tokens come out of a round: never draft past the budget or the draft's context.
            cap = min(budget - len(new) - 1, source.max_tokens(n))
            if cap > 0:
                plan = schedule.plan(source.offers(context), cap)
            if plan.k > 0:
                proposal = source.propose(context, plan, sampling, generator)
        t2 = time.perf_counter()
        drafts = proposal.tokens
        logits = target.forward([context[-1]] + drafts, n - 1)  # (K+1, V)
        accepted, extra = verify_round(logits, proposal, sampling, generator)
        t3 = time.perf_counter()
        schedule.record(Round(plan, len(drafts), accepted, proposal.step_seconds, len(drafts) + 1, t3 - t2,
                              proposal.catchup_tokens, proposal.catchup_seconds))
        draft_s, verify_s = draft_s + t2 - t1, verify_s + t3 - t2
        rounds += 1
        draft_forwards += proposal.forwards
        drafted_total += len(drafts)
        accepted_total += accepted
        if drafts:
            accepted_per_round.append(accepted)
            accepted_per_pos += [0] * (len(drafts) - len(accepted_per_pos))
            for i in range(accepted):
                accepted_per_pos[i] += 1
        out = drafts[:accepted] + [extra]  # never past the budget: K <= budget - len(new) - 1
        why = emit(out, accepted)
        context += out

    seconds = time.perf_counter() - t0
    per = max(rounds, 1)
    stats = {
        "draft_tokens": draft_tokens if source is not None else 0,
        "rounds": rounds,
        "draft_n": drafted_total,
        "draft_n_accepted": accepted_total,
        "accepted_per_pos": accepted_per_pos,
        "accepted_per_round": accepted_per_round,
        "acceptance_rate": accepted_total / drafted_total if drafted_total else 0.0,
        "mean_accepted": accepted_total / per,
        "tokens_per_round": (len(new) - from_prefill) / per,
        "mean_k": drafted_total / per,
        "draft_forwards": draft_forwards,
        "draft_seconds": round(draft_s, 4),
        "verify_seconds": round(verify_s, 4),
        "tokens_per_second": len(new) / seconds if seconds > 0 else 0.0,
    }
    return GenerationResult(new, len(prompt), seconds, prefill_s, why or reason, stats)
