"""The draft/verify loop.

Invariant at the start of each round: the context (prompt + accepted tokens) has n tokens and
the target has cached positions 0..n-2; its last token is pending. The draft proposes
d_1..d_K; the target runs ONE forward over [context[-1], d_1..d_K] at positions n-1..n-1+K,
whose K+1 logits score every proposal and give one more token after the last kept one. The
longest acceptable prefix is kept plus that token; the target's cache then holds exactly the
kept positions before the new pending token, and anything it wrote past them is written over
next round. Greedy keeps a proposal iff it is the target's argmax, so the output is the
target's own greedy output. Sampling uses modified rejection sampling (Leviathan et al. 2023,
Chen et al. 2023), so the output is distributed exactly as the target's own sampling from
`logits_to_probs`, whatever the draft.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from slm.errors import SlmError
from slm.generate import GenerationResult
from slm.sampling import SamplingParams, logits_to_probs, next_token
from slm.speculative.drafts import Draft, Proposal, as_draft
from slm.speculative.lm import as_lm
from slm.speculative.schedule import AdaptiveK, FixedK


def parse_draft_tokens(value: str) -> int | str:
    """`--draft-tokens`: a non-negative integer K, or "auto"."""
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        k = -1
    if k < 0:
        raise SlmError(f"--draft-tokens must be a non-negative integer or 'auto', got {value!r}")
    return k


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """logits (K+1, V) of the target at [pending, d_1..d_K] -> (accepted count, next token)."""
    best = logits.argmax(-1).tolist()  # (K+1,)
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Modified rejection sampling. p (K+1, V) target distributions, q (K, V) the draft's, drafts
    the K proposed tokens (d_i drawn from q_i). Accept d_i with probability min(1, p_i/q_i); at the
    first rejection draw from norm(max(0, p_i - q_i)); after K acceptances draw from p_K.
    -> (accepted count, next token)."""
    k = len(drafts)
    if k:
        d = torch.tensor(drafts, device=p.device)
        rows = torch.arange(k, device=p.device)
        u = torch.rand(k, generator=generator, device=p.device)
        # u < p/q without the division; q(d) > 0 since d was drawn from q.
        accept = (u * q[rows, d] < p[rows, d]).tolist()
        n = accept.index(False) if False in accept else k
    else:
        n = 0
    if n < k:
        residual = (p[n] - q[n]).clamp_min(0.0)
        # Rejection means p(d) < q(d), so the residual has mass; fp rounding aside, fall back to p.
        dist = residual if residual.sum() > 0 else p[n]
    else:
        dist = p[k]
    return n, int(torch.multinomial(dist, 1, generator=generator))


def _one_hot(tokens: list[int], vocab: int, device) -> torch.Tensor:
    q = torch.zeros(len(tokens), vocab, device=device)
    q[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 1.0
    return q  # (K, V)


def speculative_generate(
    target,
    draft,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    *,
    draft_tokens: int | str = "auto",
    stop_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generate like `slm.generate.generate`, with `draft` proposing tokens for `target` to verify.

    target: an slm Transformer, a transformers causal LM, or a CachedLM.
    draft: a Draft (ModelDraft, NgramDraft: see `load_draft`) or a model as for target.
    draft_tokens: K tokens proposed per round (0 = plain decoding), or "auto" (adaptive).
    stats: acceptance_rate (accepted draft tokens / drafted tokens, as AMD defines it),
        mean_accepted (accepted draft tokens per target forward), tokens_per_target_forward
        (including the target's own token), target_forwards (verify passes; the prefill is extra
        and gives the first new token),
        draft_forwards, drafted_tokens, accepted_tokens, mean_k, draft_seconds, verify_seconds,
        accepted_per_round (accepted draft tokens in each round that drafted).
        tokens_per_second (prefill included, as `GenerationResult.tokens_per_second`).
    """
    with torch.inference_mode():
        return _generate(target, draft, prompt, max_new_tokens, sampling, draft_tokens, stop_ids, generator,
                         should_stop, on_token)


def _generate(target, draft, prompt, max_new_tokens, sampling, draft_tokens, stop_ids, generator, should_stop,
              on_token) -> GenerationResult:
    target = as_lm(target)
    draft: Draft = as_draft(draft, target.vocab_size)
    draft.check_target(target)
    prompt = list(prompt)
    if max_new_tokens < 0:
        raise SlmError(f"max-new-tokens must be >= 0, got {max_new_tokens}")
    if not prompt:
        raise SlmError("the prompt is empty (0 tokens)")
    if len(prompt) >= target.max_seq_len:
        raise SlmError(f"the prompt has {len(prompt)} tokens, but the target's context is {target.max_seq_len}")
    bad = [t for t in prompt if not 0 <= t < target.vocab_size]
    if bad:
        raise SlmError(f"prompt token id {bad[0]} is outside the target's vocabulary (size {target.vocab_size})")
    if draft_tokens == "auto":
        if draft.schedule is None:
            draft.schedule = AdaptiveK()
        schedule = draft.schedule
    elif isinstance(draft_tokens, int) and draft_tokens >= 0:
        schedule = FixedK(draft_tokens)
    else:
        raise SlmError(f"draft_tokens must be a non-negative integer or 'auto', got {draft_tokens!r}")
    if stop_ids is None:
        stop_ids = () if target.eos_id is None else (target.eos_id,)
    stop = set(stop_ids)
    budget = min(max_new_tokens, target.max_seq_len - len(prompt))
    reason = "length" if budget == max_new_tokens else "context"

    t0 = time.perf_counter()
    target.prepare(len(prompt) + budget)
    draft.reset(len(prompt) + budget)
    c = dict(target_forwards=0, draft_forwards=0, drafted_tokens=0, accepted_tokens=0)
    new: list[int] = []

    def emit(tokens: list[int]) -> bool:
        """Append the round's tokens to the output; True when a stop condition ended it."""
        nonlocal reason
        for tok in tokens:
            new.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop:
                reason = "eos"
            elif should_stop is not None and should_stop(new):
                reason = "stop"
            else:
                continue
            return True
        return False

    # The prefill scores the whole prompt, so its last logits give the first new token; then the
    # round invariant holds (that token pending, everything before it cached).
    done = budget == 0
    if not done:
        logits = target.forward(prompt, 0, last_only=True)  # (1, V)
        done = emit([int(next_token(logits[-1], sampling, generator))])
    from_prefill = len(new)
    prefill_s = time.perf_counter() - t0

    context = prompt + new
    draft_total = verify_total = 0.0
    accepted_per_round: list[int] = []  # rounds that drafted: accepted draft tokens in each
    while not done and len(new) < budget:
        n = len(context)
        # K+1 tokens come out of a round: never draft past the budget or the draft's context.
        cap = min(budget - len(new) - 1, draft.max_tokens(n))
        t1 = time.perf_counter()
        if cap > 0:
            # The draft asks for its K once it knows its proposal's evidence and catch-up (see AdaptiveK).
            k_for = lambda ev, catchup: max(0, min(schedule.next_k(ev, catchup), cap))
            proposal = draft.propose(context, k_for, sampling, generator)
        else:
            proposal = Proposal([], None)
        t2 = time.perf_counter()
        drafts = proposal.tokens
        logits = target.forward([context[-1]] + drafts, n - 1)  # (K+1, V)
        if sampling.greedy:
            accepted, extra = verify_greedy(logits, drafts)
        else:
            q = proposal.probs if proposal.probs is not None else _one_hot(drafts, target.vocab_size, logits.device)
            accepted, extra = rejection_sample(logits_to_probs(logits, sampling), q, drafts, generator)
        t3 = time.perf_counter()
        schedule.update(len(drafts), accepted, proposal.step_seconds, len(drafts) + 1, t3 - t2, proposal.evidence,
                        catchup_tokens=proposal.catchup_tokens, catchup_s=proposal.catchup_seconds)
        draft_total, verify_total = draft_total + t2 - t1, verify_total + t3 - t2
        c["target_forwards"] += 1
        c["draft_forwards"] += proposal.forwards
        c["drafted_tokens"] += len(drafts)
        c["accepted_tokens"] += accepted
        if drafts:
            accepted_per_round.append(accepted)
        out = drafts[:accepted] + [extra]  # never past the budget: K <= budget - len(new) - 1
        done = emit(out)
        context = context + out

    rounds = max(c["target_forwards"], 1)
    stats = {
        "draft_tokens": draft_tokens,
        "acceptance_rate": c["accepted_tokens"] / c["drafted_tokens"] if c["drafted_tokens"] else 0.0,
        "mean_accepted": c["accepted_tokens"] / rounds,
        "tokens_per_target_forward": (len(new) - from_prefill) / rounds,
        "target_forwards": c["target_forwards"],
        "draft_forwards": c["draft_forwards"],
        "drafted_tokens": c["drafted_tokens"],
        "accepted_tokens": c["accepted_tokens"],
        "mean_k": c["drafted_tokens"] / rounds,
        "draft_seconds": round(draft_total, 4),
        "verify_seconds": round(verify_total, 4),
        "accepted_per_round": accepted_per_round,
    }
    seconds = time.perf_counter() - t0
    stats["tokens_per_second"] = len(new) / seconds if seconds > 0 else 0.0
    return GenerationResult(new, len(prompt), seconds, prefill_s, reason, stats)
