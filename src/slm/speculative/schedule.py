"""How many tokens to draft each round: a constant K, or `AdaptiveK`.

AdaptiveK picks the K that maximises expected tokens per second under the standard model of
speculative decoding (Leviathan et al.), with two refinements:

- Bursty acceptance: the first proposal of a round is accepted with probability a1 and each
  later one (given the previous) with a, since drafts such as prompt lookup are bursty (a wrong
  guess is usually wrong from its first token; a right one stays right). A round drafting K
  tokens then yields 1 + a1 (1 - a^K) / (1 - a) tokens (with a1 = a, the usual
  (1 - a^(K+1)) / (1 - a)) and costs K draft steps plus one verify over K+1 tokens.
- Evidence: a draft may say how good a proposal is likely to be before the round's K is chosen
  (`Proposal.evidence`: for prompt lookup, the length of the matched n-gram; a match of 1 token
  is right ~15% of the time on HumanEval, one of 8+ tokens ~95%). Acceptance and draft cost
  are learned per evidence value, so a weak match drafts little or nothing and a strong one
  drafts long. A model draft has one evidence value (0): one set of statistics.

Acceptance and both costs are measured as it runs (exponential moving averages). It drafts
only when that predicts a gain of at least `min_gain` over plain decoding (timings on a shared
machine are noisy), so it backs off to K = 0 when the draft does not pay, and then probes now
and then with one drafted token, at growing intervals, in case the text has become easier.

A probe is not free for a draft model with its own KV cache: it must first be fed every token
of the rounds it sat out (a catch-up forward over all of them), so however far apart the probes
are, probing feeds it nearly the whole text. A useless draft then costs a few % to the end of
the generation. So a probe that needs a catch-up is made only while the catch-ups of all probes
so far, this one's predicted cost included, stay within `probe_budget` of the decoding time so
far (the draft's measured seconds per caught-up token times the tokens it would feed).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def next_k(self, evidence: int = 0, catchup: int = 0) -> int:
        return self.k

    def update(self, drafted: int, accepted: int, step_s: float | None, verify_tokens: int, verify_s: float,
               evidence: int = 0, *, catchup_tokens: int = 0, catchup_s: float = 0.0) -> None:
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
    min_gain: float = 1.05  # predicted speedup over plain decoding needed to draft at all
    probe_budget: float = 0.01  # probes' catch-up seconds, at most this fraction of the decoding seconds
    verify_s: dict[int, float] = field(default_factory=dict)  # tokens verified -> seconds per verify forward
    evidence: dict[int, _Evidence] = field(default_factory=dict)
    # Totals since this schedule was made (it lives with its draft, across generations).
    decode_s: float = 0.0  # seconds of verify forwards: the decoding time probes are budgeted against
    catchup_tokens: int = 0  # tokens the draft was fed to catch up, and the seconds that took
    catchup_s: float = 0.0
    probe_s: float = 0.0  # catch-up seconds spent by probes
    _probing: bool = field(default=False, init=False, repr=False)  # the K just handed out is a probe

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
            tokens = 1.0 + a1 * (1.0 - a**k) / (1.0 - a)
            rate = tokens / (k * st.draft_s + self._verify_cost(k + 1))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def _probe_affordable(self, catchup: int) -> bool:
        if not catchup or not self.catchup_tokens:  # nothing to catch up, or its cost not yet measured
            return True
        cost = catchup * self.catchup_s / self.catchup_tokens
        return self.probe_s + cost <= self.probe_budget * self.decode_s

    def next_k(self, evidence: int = 0, catchup: int = 0) -> int:
        """K for the next round, given the proposal's evidence and the tokens the draft would
        have to catch up on before proposing."""
        self._probing = False
        if 1 not in self.verify_s:  # first measure a plain decode step: the baseline every K is judged by
            return 0
        st = self._stats(evidence)
        if st.k == 0:
            st.idle_rounds += 1
            if st.idle_rounds >= st.probe_every and self._probe_affordable(catchup):
                st.idle_rounds = 0
                st.probe_every = min(2 * st.probe_every, self.probe_max)
                self._probing = True
                return 1
        return st.k

    def update(self, drafted: int, accepted: int, step_s: float | None, verify_tokens: int, verify_s: float,
               evidence: int = 0, *, catchup_tokens: int = 0, catchup_s: float = 0.0) -> None:
        """One round: `drafted` proposals (of this evidence) of which `accepted` were kept; step_s
        seconds per draft token (None: not measured); one target forward over verify_tokens took
        verify_s; before proposing, the draft caught up on catchup_tokens tokens in catchup_s seconds."""
        d = self.decay
        ema = lambda old, new: new if old is None else d * old + (1 - d) * new  # noqa: E731
        self.verify_s[verify_tokens] = ema(self.verify_s.get(verify_tokens), verify_s)
        self.decode_s += verify_s
        if catchup_tokens:
            self.catchup_tokens += catchup_tokens
            self.catchup_s += catchup_s
            if self._probing:
                self.probe_s += catchup_s
        self._probing = False
        if not drafted:
            return
        st = self._stats(evidence)
        if step_s is not None:
            st.draft_s = ema(st.draft_s, step_s)
        st.first_successes = d * st.first_successes + (accepted > 0)
        st.first_trials = d * st.first_trials + 1
        if accepted > 0 and drafted > 1:  # later proposals: accepted - 1 successes, then a failure unless all
            st.successes = d * st.successes + accepted - 1
            st.trials = d * st.trials + accepted - 1 + (accepted < drafted)
        if st.draft_s is None:
            return  # no cost measured yet: keep the starting K
        st.k = self._best_k(st)
        if st.k > 0:
            st.probe_every = self.probe_min
