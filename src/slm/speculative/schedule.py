"""How many tokens to draft each round: a constant K, or `AdaptiveK`; and the speedup formula.

The protocol, once per round (`slm.generate` runs it; nothing else decides K):
1. the draft states what it could propose, without spending anything: `Draft.offers(context)`,
   a list of `Offer`s in its order of preference, each with its evidence and its catch-up cost;
2. the schedule decides: `plan(offers, cap)` -> `Plan` (which offer, K, whether it is a probe);
3. the draft proposes `plan.k` tokens for `plan.offer` (`Draft.propose`);
4. the target verifies, and the schedule records the round: `record(Round)`.

AdaptiveK picks the K that maximises expected tokens per second under the standard model of
speculative decoding (Leviathan et al.), with two refinements:

- Bursty acceptance: the first proposal of a round is accepted with probability a1 and each
  later one (given the previous) with a, since drafts such as prompt lookup are bursty (a wrong
  guess is usually wrong from its first token; a right one stays right). A round drafting K
  tokens then yields 1 + a1 (1 - a^K) / (1 - a) tokens (with a1 = a, the usual
  (1 - a^(K+1)) / (1 - a)) and costs K draft steps plus one verify over K+1 tokens.
- Evidence: a draft may say how good a proposal is likely to be before the round's K is chosen
  (`Offer.evidence`: for prompt lookup, the length of the matched n-gram; a match of 1 token
  is right ~15% of the time on HumanEval, one of 8+ tokens ~95%). Acceptance and draft cost
  are learned per evidence value, so a weak match drafts little or nothing and a strong one
  drafts long. A model draft has one evidence value (0): one set of statistics.

Acceptance and both costs are measured as it runs (exponential moving averages; the costs'
robust to a stalled step, see `_cost`). It drafts
only when that predicts a gain of at least `min_gain` over plain decoding (timings on a shared
machine are noisy), so it backs off to K = 0 when the draft does not pay, and then probes now
and then with k_start drafted tokens, at growing intervals, in case the text has become easier.

A probe is not free for a draft model with its own KV cache: it must first be fed every token
of the rounds it sat out (a catch-up forward over all of them), so however far apart the probes
are, probing feeds it nearly the whole text. A useless draft then costs a few % to the end of
the generation. So a probe that needs a catch-up is made only while the catch-ups of all probes
so far, this one's predicted cost included, stay within `probe_budget` of the decoding time so
far (the draft's measured seconds per caught-up token times the tokens it would feed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slm.errors import SlmError


def expected_tokens(k: int, a: float, a1: float | None = None) -> float:
    """Tokens a round yields when it drafts k tokens: the accepted ones plus the target's own.
    a1: acceptance of a round's first proposal, a: of each later one given the previous (a1 = a:
    Leviathan et al.'s (1 - a^(k+1)) / (1 - a))."""
    a1 = a if a1 is None else a1
    if a >= 1.0:
        return 1.0 + a1 * k
    return 1.0 + a1 * (1.0 - a**k) / (1.0 - a)


def predicted_speedup(a: float, k: int, c: float, v: float = 1.0, a1: float | None = None) -> float:
    """Expected speedup over plain decoding (Leviathan et al.): tokens per round / cost of a round in
    decode steps. c: a draft token's cost in target decode steps; v: the verify forward's (1 in the paper)."""
    return expected_tokens(k, a, a1) / (k * c + v)


def break_even_acceptance(k: int, c: float, v: float = 1.0) -> float | None:
    """The acceptance at which drafting k tokens starts to pay (predicted speedup 1), if any."""
    hi = 0.999999
    if k <= 0 or predicted_speedup(hi, k, c, v) < 1:
        return None
    lo = 0.0
    for _ in range(60):  # bisection: the speedup grows with the acceptance
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_speedup(mid, k, c, v) < 1 else (lo, mid)
    return hi


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


def check_draft_tokens(draft_tokens) -> None:
    if draft_tokens != "auto" and not (isinstance(draft_tokens, int) and draft_tokens >= 0):
        raise SlmError(f"draft_tokens must be a non-negative integer or 'auto', got {draft_tokens!r}")


# --- the protocol ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """What a draft could propose this round, stated before it spends anything."""

    draft: object  # the Draft that would propose (a HybridDraft offers for its lookup and its model)
    # How promising the proposal looks (prompt lookup: the matched n-gram's length; a model draft: 0).
    evidence: int = 0
    # Tokens the draft must feed its own KV cache before proposing (its prefill, or the rounds it sat
    # out): a probe that needs a catch-up costs that forward.
    catchup: int = 0
    start: int = 0  # where a lookup's continuation starts in the context (prompt lookup only)


@dataclass(frozen=True)
class Plan:
    """The schedule's decision for a round: draft k tokens from `offer` (k = 0: plain decoding)."""

    offer: Offer | None = None
    k: int = 0
    probe: bool = False  # a K = 1 try of an evidence value the schedule had backed off from


NO_DRAFT = Plan()


@dataclass(frozen=True)
class Round:
    """What one round did, for the schedule to learn from."""

    plan: Plan
    drafted: int  # tokens proposed
    accepted: int  # of which the target kept this many
    step_s: float | None  # seconds per proposed token in steady state (None: not measured)
    verify_tokens: int  # tokens the target's forward scored (drafted + 1)
    verify_s: float
    catchup_tokens: int = 0  # what the draft fed its cache first, and the seconds that took
    catchup_s: float = 0.0


class FixedK:
    """A constant K: always the draft's first offer."""

    def __init__(self, k: int):
        self.k = k

    def plan(self, offers: list[Offer], cap: int) -> Plan:
        if not offers or self.k <= 0 or cap <= 0:
            return NO_DRAFT
        return Plan(offers[0], min(self.k, cap))

    def record(self, round: Round) -> None:
        pass


@dataclass
class _Evidence:
    """What is known about the proposals of one evidence value."""

    k: int
    probe_every: int
    # Acceptance as moving success/trial counts (first proposal; later ones), weak priors of 0.5.
    first_successes: float = 1.0
    first_trials: float = 2.0
    successes: float = 1.0
    trials: float = 2.0
    draft_s: float | None = None  # seconds per drafted token
    cost_samples: int = 0  # rounds that measured draft_s
    idle_rounds: int = 0

    @property
    def acceptance(self) -> tuple[float, float]:
        """(a1, a): acceptance of a round's first proposal, and of each later one given the previous."""
        return self.first_successes / self.first_trials, self.successes / self.trials


@dataclass
class AdaptiveK:
    k_max: int = 16
    # 2, not 1: a model draft's first round is a catch-up (its prefill), so only its second
    # drafted token measures what a draft step costs; a good draft then grows K fast.
    k_start: int = 2
    decay: float = 0.85  # weight of the past in each moving average, per round
    probe_min: int = 16  # rounds at K = 0 before the first probe; doubles after each probe that fails
    probe_max: int = 256
    # Rounds that measure the draft's cost before the cost alone may stop it (K = 0): one stalled first
    # round (a preempted thread) priced the int4 self-draft out of a fresh server's first requests
    # (benchmarks/serve.py, README's session 10 run 1).
    cost_rounds: int = 3
    min_gain: float = 1.05  # predicted speedup over plain decoding needed to draft at all
    probe_budget: float = 0.01  # probes' catch-up seconds, at most this fraction of the decoding seconds
    verify_s: dict[int, float] = field(default_factory=dict)  # tokens verified -> seconds per verify forward
    evidence: dict[int, _Evidence] = field(default_factory=dict)
    # Totals since this schedule was made (it lives with its draft, across generations).
    decode_s: float = 0.0  # seconds of verify forwards: the decoding time probes are budgeted against
    catchup_tokens: int = 0  # tokens the draft was fed to catch up, and the seconds that took
    catchup_s: float = 0.0
    probe_s: float = 0.0  # catch-up seconds spent by probes

    def _stats(self, evidence: int) -> _Evidence:
        if evidence not in self.evidence:
            self.evidence[evidence] = _Evidence(k=self.k_start, probe_every=self.probe_min)
        return self.evidence[evidence]

    @property
    def k(self) -> int:
        """The current K of evidence 0 (a model draft's only one)."""
        return self._stats(0).k

    def _verify_cost(self, tokens: int) -> float:
        if tokens in self.verify_s:
            return self.verify_s[tokens]
        # Unmeasured width: borrow the nearest measured one (optimistic upward, so it gets tried).
        nearest = min(self.verify_s, key=lambda t: (abs(t - tokens), t))
        return self.verify_s[nearest]

    def _best_k(self, st: _Evidence) -> int:
        a1, a = st.acceptance
        # At K = 1 the later proposals are never seen, so a stale low `a` could pin K at 1 for
        # good; drafts are at least as likely right after a right token as at a round's start.
        a = min(max(a, a1), 0.999)
        best_k, best_rate = 0, self.min_gain / self._verify_cost(1)
        for k in range(1, self.k_max + 1):
            rate = expected_tokens(k, a, a1) / (k * st.draft_s + self._verify_cost(k + 1))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def _probe_affordable(self, catchup: int) -> bool:
        if not catchup or not self.catchup_tokens:  # nothing to catch up, or its cost not yet measured
            return True
        cost = catchup * self.catchup_s / self.catchup_tokens
        return self.probe_s + cost <= self.probe_budget * self.decode_s

    def plan(self, offers: list[Offer], cap: int) -> Plan:
        """The first offer (in the draft's order of preference) whose evidence calls for drafting,
        and its K, capped at `cap`; no offer drafts: K = 0."""
        if cap <= 0:
            return NO_DRAFT
        for offer in offers:
            k, probe = self._decide(offer)
            if k > 0:
                return Plan(offer, min(k, cap), probe)
        return NO_DRAFT

    def _decide(self, offer: Offer) -> tuple[int, bool]:
        """(K, probe) for an offer, given its evidence and the tokens it would catch up on first."""
        if 1 not in self.verify_s:  # first measure a plain decode step: the baseline every K is judged by
            return 0, False
        st = self._stats(offer.evidence)
        if st.k == 0:
            st.idle_rounds += 1
            if st.idle_rounds >= st.probe_every and self._probe_affordable(offer.catchup):
                st.idle_rounds = 0
                st.probe_every = min(2 * st.probe_every, self.probe_max)
                # k_start tokens, not 1: a model draft's first forward after target-only rounds finds its
                # weights out of cache, so a 1-token probe measures it at its slowest and may never bring
                # a cost estimate back down.
                return self.k_start, True
        return st.k, False

    def _cost(self, old: float | None, new: float) -> float:
        """A moving average of a time, robust to the host: noise on a shared machine only ever adds
        time (a preempted thread, a neighbour's burst), so a measurement above twice the average counts
        as twice, and one below it moves the average halfway at once. Without this, one stalled draft
        step could price a draft out (K = 0) for the rest of a short generation, probes being rare."""
        if old is None:
            return new
        if new < old:
            return 0.5 * (old + new)
        return self.decay * old + (1 - self.decay) * min(new, 2 * old)

    def record(self, round: Round) -> None:
        """Learn from one round: the verify forward's cost, the draft's catch-up and step cost, and
        how many of its proposals (of the planned offer's evidence) the target kept."""
        d = self.decay
        self.verify_s[round.verify_tokens] = self._cost(self.verify_s.get(round.verify_tokens), round.verify_s)
        self.decode_s += round.verify_s
        if round.catchup_tokens:
            self.catchup_tokens += round.catchup_tokens
            self.catchup_s += round.catchup_s
            if round.plan.probe:
                self.probe_s += round.catchup_s
        drafted, accepted = round.drafted, round.accepted
        if not drafted:
            return
        st = self._stats(round.plan.offer.evidence)
        if round.step_s is not None:
            st.draft_s = self._cost(st.draft_s, round.step_s)
            st.cost_samples += 1
        st.first_successes = d * st.first_successes + (accepted > 0)
        st.first_trials = d * st.first_trials + 1
        if accepted > 0 and drafted > 1:  # later proposals: accepted - 1 successes, then a failure unless all
            st.successes = d * st.successes + accepted - 1
            st.trials = d * st.trials + accepted - 1 + (accepted < drafted)
        if st.draft_s is None:
            return  # no cost measured yet: keep the starting K
        k = self._best_k(st)
        if k == 0 and st.cost_samples < self.cost_rounds and st.acceptance[0] >= 0.5:
            return  # priced out by its cost alone, measured too few times yet: keep K (see cost_rounds)
        st.k = k
        if st.k > 0:
            st.probe_every = self.probe_min


def schedule_for(draft, draft_tokens: int | str):
    """The schedule of a generation: FixedK, or for "auto" the draft's own AdaptiveK (kept with the
    draft, so what it learned about this draft carries over from one generation to the next)."""
    check_draft_tokens(draft_tokens)
    return draft.auto_schedule if draft_tokens == "auto" else FixedK(draft_tokens)
