"""Verification: which of a round's proposals the target keeps, and its one token after them.

The loop that runs the rounds is `slm.generate.generate`.

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

import torch

from slm.sampling import SamplingParams, argmax, logits_to_probs
from slm.speculative.drafts import Proposal


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """logits (K+1, V) of the target at [pending, d_1..d_K] -> (accepted count, next token)."""
    best = argmax(logits).tolist()  # (K+1,)
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


def verify_round(logits: torch.Tensor, proposal: Proposal, sampling: SamplingParams, generator=None) -> tuple[int, int]:
    """The target's logits (K+1, V) at [pending, d_1..d_K] -> (accepted count, next token)."""
    drafts = proposal.tokens
    if sampling.greedy:
        return verify_greedy(logits, drafts)
    q = proposal.probs if proposal.probs is not None else _one_hot(drafts, logits.shape[-1], logits.device)
    return rejection_sample(logits_to_probs(logits, sampling), q, drafts, generator)
