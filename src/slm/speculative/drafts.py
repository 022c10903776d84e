"""Draft sources: a smaller model (slm or transformers), or prompt lookup (n-gram matching).

Each round a draft first says what it could propose (`offers`: evidence and catch-up cost, see
`slm.speculative.schedule`), then proposes as many tokens as the schedule's plan says, together
with the distribution q it drew each one from (None for a deterministic proposal: q is then the
one-hot of the token, which rejection sampling handles exactly). Distributions are over the target's vocabulary: a draft
whose vocabulary is a prefix of the target's gives the missing ids probability 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slm.errors import SlmError
from slm.native import decoder
from slm.sampling import SamplingParams, argmax, logits_to_probs, sample
from slm.speculative.lm import CachedLM, SlmLM, as_lm
from slm.speculative.schedule import AdaptiveK, Offer, Plan


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # (len(tokens), V_target) draft distributions; None: deterministic
    forwards: int = 0  # draft model forward passes spent
    # Seconds per proposed token in steady state (a catch-up forward over many tokens excluded,
    # so that one long catch-up does not make the draft look slow); None: not measured.
    step_seconds: float | None = None
    # A draft with its own KV cache first feeds it what the context gained since it last ran
    # (its prefill, or the tokens of rounds it sat out): how many tokens, and the seconds spent.
    catchup_tokens: int = 0
    catchup_seconds: float = 0.0


NOTHING = Proposal([], None)


def roll_out(state, k: int, pick, advance) -> tuple[list[int], list]:
    """k proposals: pick(state) -> (token, q); advance(state, token, i) -> the state after the i-th
    (not called after the last: its successor is never needed)."""
    tokens, probs = [], []
    for i in range(k):
        tok, q = pick(state)
        tokens.append(tok)
        probs.append(q)
        if i + 1 < k:
            state = advance(state, tok, i)
    return tokens, probs


def timed_proposal(tokens: list[int], probs: list, sampling: SamplingParams, times: tuple[float, float, float],
                   steady: bool, catchup: int) -> Proposal:
    """A model draft's Proposal. times: start, after the first forward (the catch-up, if not
    steady), end. In steady state every forward counts as a draft step; after a catch-up, only
    those after the first."""
    t0, t1, t2 = times
    k = len(tokens)
    spent, steps = (t2 - t0, k) if steady else (t2 - t1, k - 1)
    return Proposal(tokens, None if sampling.greedy else torch.stack(probs), forwards=k,
                    step_seconds=spent / steps if steps > 0 else None,
                    catchup_tokens=0 if steady else catchup, catchup_seconds=0.0 if steady else t1 - t0)


class Draft:
    """Interface of a draft source."""

    def __init__(self):
        # The adaptive schedule of `draft_tokens="auto"`, kept with the draft so that what it learned
        # about this draft's acceptance and cost carries over from one generation to the next (a
        # useless draft is then only probed, not re-tried at full K at the start of every prompt).
        self.auto_schedule = AdaptiveK()

    def reset(self, length: int) -> None:
        """Start a new sequence of up to `length` tokens."""

    def max_tokens(self, context_len: int) -> int:
        """How many tokens this draft can propose after a context of this length."""
        return 1 << 30

    def check_target(self, target) -> None:
        """Raise SlmError if this draft cannot serve `target` (a CachedLM)."""

    def offers(self, context: list[int]) -> list[Offer]:
        """What this draft could propose after `context`, best first, without spending anything."""
        raise NotImplementedError

    def propose(self, context: list[int], plan: Plan, sampling: SamplingParams, generator=None) -> Proposal:
        """plan.k tokens (plan.k > 0) to follow `context`, for plan.offer (one of this draft's offers)."""
        raise NotImplementedError


class ModelDraft(Draft):
    """A draft language model with its own KV cache.

    The cache trails the context: after a round, the draft has cached the old context plus its
    own proposals except the last; the target then keeps a prefix of them and adds one token.
    The next `propose` finds how much of its cache is still valid (the common prefix of what it
    fed and the new context) and feeds the rest in one forward: usually 1 token, 2 after a full
    accept (the last draft token and the target's bonus token), more after rounds without drafting.
    """

    def __init__(self, lm: CachedLM, target_vocab: int):
        super().__init__()
        self.lm = lm
        self.target_vocab = target_vocab
        self.width = min(lm.vocab_size, target_vocab)  # draft logits beyond the target's vocabulary are dropped
        self.fed: list[int] = []  # tokens written to the draft's cache, by position
        self.base = 0  # context length at the last propose: fed[:base] is known to match the context

    def reset(self, length: int) -> None:
        self.lm.prepare(length)
        self.fed, self.base = [], 0

    def max_tokens(self, context_len: int) -> int:
        return self.lm.max_seq_len - context_len  # draft tokens occupy positions context_len..

    def _valid_prefix(self, context: list[int]) -> int:
        n, fed = self.base, self.fed
        limit = min(len(fed), len(context) - 1)  # always re-feed the last token: we need its logits
        while n < limit and fed[n] == context[n]:
            n += 1
        return min(n, limit)

    def _embeddable(self, tokens: list[int]) -> list[int]:
        # Target-only ids (beyond a smaller draft vocabulary) cannot be embedded by the draft: it
        # sees id 0 (<unk> in LLaMA vocabularies) there. Its guesses get worse, never the output.
        v = self.lm.vocab_size
        return [t if t < v else 0 for t in tokens]

    def _pick(self, logits: torch.Tensor, sampling: SamplingParams, generator) -> tuple[int, torch.Tensor | None]:
        logits = logits[: self.width]
        if sampling.greedy:
            return int(argmax(logits)), None
        q = logits_to_probs(logits, sampling)  # (width,)
        return int(sample(q, generator)), F.pad(q, (0, self.target_vocab - self.width))  # (V_target,)

    def offers(self, context: list[int]) -> list[Offer]:
        # Steady state feeds 1 token (2 after a full accept); more is a catch-up.
        behind = len(context) - self._valid_prefix(context)
        return [Offer(self, catchup=0 if behind <= 2 else behind)]

    def propose(self, context: list[int], plan: Plan, sampling: SamplingParams, generator=None) -> Proposal:
        n, k = len(context), plan.k
        valid = self._valid_prefix(context)
        steady = n - valid <= 2
        t0 = time.perf_counter()
        logits = self.lm.forward(self._embeddable(context[valid:]), valid, last_only=True)[-1]
        t1 = time.perf_counter()
        # the last proposal's logits are never needed
        tokens, probs = roll_out(logits, k, lambda lg: self._pick(lg, sampling, generator),
                                 lambda _, tok, i: self.lm.forward([tok], n + i, last_only=True)[-1])
        self.fed = context + tokens[:-1]
        self.base = n
        return timed_proposal(tokens, probs, sampling, (t0, t1, time.perf_counter()), steady, n - valid)


class SelfDraft(ModelDraft):
    """The target's own quantized copy as a draft, reading and writing the target's KV cache.

    Sharing is safe because the cache is written by position: at the start of a round the
    target has written positions 0..n-2 (exact keys/values, better than the copy's own), the
    draft writes n-1.. while proposing, and the target's verify forward then writes every
    position from n-1 on before reading it. So the draft never prefills the prompt and never
    catches up after rounds it sat out (prompt lookup rounds of `auto`, or K = 0): each round it
    feeds just the pending token, then its own proposals."""

    def __init__(self, draft_model, target_model):
        super().__init__(SlmLM(draft_model), target_model.config.vocab_size)
        self.target_model = target_model

    def reset(self, length: int) -> None:
        # The target's cache must already hold `length` positions (generate prepares it first).
        target, draft = self.target_model, self.lm.model
        if target.cache_len < length:
            raise RuntimeError(f"the target's KV cache holds {target.cache_len} positions, {length} needed")
        for mine, theirs in zip(draft.layers, target.layers):
            mine.attention.kv_cache = theirs.attention.kv_cache
        draft.cache_len = target.cache_len
        self.fed, self.base = [], 0
        # Made now, not in the first proposal: building it copies the weights into the kernels' layout,
        # which timed as a draft step would make the schedule judge the draft too slow to use.
        self.lm.run = decoder(draft)

    def check_target(self, target) -> None:
        if getattr(target, "model", None) is not self.target_model:
            raise SlmError("this quantized self-draft was made from another model than the target it is asked to serve")

    def _valid_prefix(self, context: list[int]) -> int:
        return len(context) - 1  # everything before the pending token is in the target's cache


class NgramDraft(Draft):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n
    first, n = max_ngram..min_ngram) and propose the tokens that followed it. No model, no cost;
    strong when the output copies from the prompt (code, edits, quotations). The matched length
    n is the proposal's evidence: on HumanEval a 1-token match is right ~15% of the time, an
    8-token one ~95%, so `AdaptiveK` drafts little after a short match and long after a long one."""

    def __init__(self, max_ngram: int = 8, min_ngram: int = 1):
        super().__init__()
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.reset(0)

    def reset(self, length: int) -> None:
        # (n-gram) -> end position (exclusive) of its latest occurrence that is not the context's suffix
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions <= indexed are in the index

    def _index_upto(self, context: list[int], end: int) -> None:
        for e in range(self.indexed + 1, end + 1):
            for n in range(1, min(self.max_ngram, e) + 1):
                self.index[tuple(context[e - n : e])] = e
        self.indexed = max(self.indexed, end)

    def offers(self, context: list[int]) -> list[Offer]:
        n = len(context)
        self._index_upto(context, n - 1)  # everything but the suffix ending at n itself
        for size in range(min(self.max_ngram, n), self.min_ngram - 1, -1):
            end = self.index.get(tuple(context[n - size :]))
            if end is not None:
                return [Offer(self, evidence=size, start=end)]
        return []

    def propose(self, context: list[int], plan: Plan, sampling: SamplingParams, generator=None) -> Proposal:
        t0, start = time.perf_counter(), plan.offer.start
        tokens = context[start : start + plan.k]
        return Proposal(tokens, None, step_seconds=(time.perf_counter() - t0) / max(len(tokens), 1))


class HybridDraft(Draft):
    """`--draft auto`: prompt lookup where the context's last `min_ngram`+ tokens occurred before
    and the schedule drafts for a match of that length, the model draft everywhere else. A
    lookup costs nothing to propose, so when code repeats what is already there (names,
    signatures, boilerplate) the model's draft steps are saved; a one-token match is too weak a
    signal to prefer over the model. The model draft's cache stays correct across lookup
    rounds: its next proposal feeds whatever the context gained meanwhile."""

    def __init__(self, lookup: NgramDraft, model: ModelDraft):
        super().__init__()
        self.lookup, self.model = lookup, model

    def reset(self, length: int) -> None:
        self.lookup.reset(length)
        self.model.reset(length)

    def check_target(self, target) -> None:
        self.model.check_target(target)

    def max_tokens(self, context_len: int) -> int:
        return self.model.max_tokens(context_len)

    def offers(self, context: list[int]) -> list[Offer]:
        return self.lookup.offers(context) + self.model.offers(context)  # lookup first: it costs nothing

    def propose(self, context: list[int], plan: Plan, sampling: SamplingParams, generator=None) -> Proposal:
        return plan.offer.draft.propose(context, plan, sampling, generator)


def as_draft(draft, target_vocab: int) -> Draft:
    """A Draft, or any model `as_lm` accepts (wrapped as a ModelDraft)."""
    return draft if isinstance(draft, Draft) else ModelDraft(as_lm(draft), target_vocab)
