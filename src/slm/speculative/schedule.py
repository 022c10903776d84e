"""How many tokens to draft each round: a constant K, or `AdaptiveK`.

AdaptiveK picks the K that maximises expected tokens per second under the standard model of
speculative decoding (Leviathan et al.), with one refinement: the first proposal of a round is
accepted with probability a1 and each later one (given the previous) with a, since drafts such
as prompt lookup are bursty (a wrong guess is usually wrong from its first token; a right one
stays right). A round drafting K tokens then yields 1 + a1 (1 - a^K) / (1 - a) tokens (with
a1 = a, the usual (1 - a^(K+1)) / (1 - a)) and costs K draft steps plus one verify over K+1
tokens. Acceptance and both costs are measured as it runs (exponential moving averages). It
drafts only when that predicts a gain of at least `min_gain` over plain decoding (timings on a
shared machine are noisy), so it backs off to K = 0 when the draft does not pay, and then
probes now and then with one drafted token, at growing intervals, in case the text has become
easier.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def next_k(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int, step_s: float | None, verify_tokens: int, verify_s: float) -> None:
        pass


@dataclass
class AdaptiveK:
    k_max: int = 16
    k_start: int = 4
    decay: float = 0.85  # weight of the past in each moving average, per round
    probe_min: int = 8  # rounds at K = 0 before the first probe; doubles after each probe that fails
    probe_max: int = 256
    min_gain: float = 1.05  # predicted speedup over plain decoding needed to draft at all
    # Acceptance as moving success/trial counts (first proposal; later ones), weak priors of 0.5.
    first_successes: float = 1.0
    first_trials: float = 2.0
    successes: float = 1.0
    trials: float = 2.0
    draft_s: float | None = None  # seconds per drafted token
    verify_s: dict[int, float] = field(default_factory=dict)  # tokens verified -> seconds per verify forward
    k: int = -1
    idle_rounds: int = 0
    probe_every: int = 0

    def __post_init__(self) -> None:
        self.k = self.k_start
        self.probe_every = self.probe_min

    @property
    def acceptance(self) -> tuple[float, float]:
        """(a1, a): acceptance of a round's first proposal, and of each later one given the previous."""
        return self.first_successes / self.first_trials, self.successes / self.trials

    def _verify_cost(self, tokens: int) -> float:
        if tokens in self.verify_s:
            return self.verify_s[tokens]
        # Unmeasured width: borrow the nearest measured one (optimistic upward, so it gets tried).
        nearest = min(self.verify_s, key=lambda t: (abs(t - tokens), t))
        return self.verify_s[nearest]

    def _best_k(self) -> int:
        a1, a = self.acceptance
        a = min(a, 0.999)
        best_k, best_rate = 0, self.min_gain / self._verify_cost(1)
        for k in range(1, self.k_max + 1):
            tokens = 1.0 + a1 * (1.0 - a**k) / (1.0 - a)
            rate = tokens / (k * self.draft_s + self._verify_cost(k + 1))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def next_k(self) -> int:
        if 1 not in self.verify_s:  # first measure a plain decode step: the baseline every K is judged by
            return 0
        if self.k == 0:
            self.idle_rounds += 1
            if self.idle_rounds >= self.probe_every:
                self.idle_rounds = 0
                self.probe_every = min(2 * self.probe_every, self.probe_max)
                return 1
        return self.k

    def update(self, drafted: int, accepted: int, step_s: float | None, verify_tokens: int, verify_s: float) -> None:
        """One round: `drafted` proposals of which `accepted` were kept; step_s seconds per draft
        token (None: not measured); one target forward over verify_tokens took verify_s."""
        d = self.decay
        ema = lambda old, new: new if old is None else d * old + (1 - d) * new  # noqa: E731
        self.verify_s[verify_tokens] = ema(self.verify_s.get(verify_tokens), verify_s)
        if step_s is not None:
            self.draft_s = ema(self.draft_s, step_s)
        if drafted:
            self.first_successes = d * self.first_successes + (accepted > 0)
            self.first_trials = d * self.first_trials + 1
            if accepted > 0 and drafted > 1:  # later proposals: accepted - 1 successes, then a failure unless all
                self.successes = d * self.successes + accepted - 1
                self.trials = d * self.trials + accepted - 1 + (accepted < drafted)
        if self.draft_s is None:
            return  # nothing drafted yet: keep the starting K
        k = self._best_k()
        if k > 0:
            self.probe_every = self.probe_min
        self.k = k
