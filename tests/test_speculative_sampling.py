"""Speculative sampling is exact: with a deliberately mismatched draft, the generated tokens are
distributed as the target's own sampling (chi-square against the exact distribution, enumerated
from the target's probabilities), and the same test rejects biased variants of the acceptance rule."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from conftest import randomize
from slm.config import get_config
from slm.model import Transformer
from slm.sampling import SamplingParams, logits_to_probs
from slm.generate import Stop, generate
from slm.speculative import NgramDraft, verify

V = 8  # a vocabulary small enough to enumerate every 2-token continuation
PROMPT = [1, 5, 3]
RUNS = 3000
_exact = verify.rejection_sample  # the real one, kept before any monkeypatching


# Tiny models run fastest on one thread, and far more predictably on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int) -> Transformer:
    model = randomize(Transformer(get_config("tiny", vocab_size=V, n_layers=1, max_seq_len=16)), seed).eval()
    with torch.no_grad():
        model.output.weight.mul_(3.0)  # peakier distributions, so target and draft differ a lot
    return model


@pytest.fixture(scope="module")
def pair():
    return _model(0), _model(1)  # different random inits: a badly mismatched draft


@torch.no_grad()
def exact_distributions(model: Transformer, sampling: SamplingParams):
    """P(t1, t2) (V, V) and P(t3) (V,) of the target's own sampling after PROMPT, by enumeration."""
    prefix = torch.tensor(PROMPT)
    p1 = logits_to_probs(model(prefix[None])[0, -1], sampling)  # (V,)
    seq2 = torch.cat([prefix.expand(V, -1), torch.arange(V)[:, None]], 1)  # (V, 4): every t1
    p2 = logits_to_probs(model(seq2)[:, -1], sampling)  # (V, V): P(t2 | t1)
    seq3 = torch.cat([seq2.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)  # (V*V, 5)
    p3 = logits_to_probs(model(seq3)[:, -1], sampling).view(V, V, V)  # P(t3 | t1, t2)
    joint12 = p1[:, None] * p2  # (V, V)
    return joint12, (joint12[:, :, None] * p3).sum((0, 1))  # (V, V), (V,)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled into one."""
    counts, expected = counts.flatten().double(), probs.flatten().double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # scipy wants equal totals to fp precision
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def sample_runs(target, draft, sampling, draft_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    c12, c3 = torch.zeros(V, V), torch.zeros(V)
    accepted = drafted = 0
    for _ in range(RUNS):
        r = generate(target, PROMPT, 3, sampling, draft=draft, draft_tokens=draft_tokens, stop=Stop(), generator=g)
        t1, t2, t3 = r.tokens
        c12[t1, t2] += 1
        c3[t3] += 1
        accepted += r.stats["draft_n_accepted"]
        drafted += r.stats["draft_n"]
    return c12, c3, accepted / max(drafted, 1)


@pytest.mark.parametrize(
    "sampling, draft_tokens, draft_kind",
    [
        (SamplingParams(temperature=1.0), 2, "model"),
        (SamplingParams(temperature=0.8, top_k=5, top_p=0.9), 1, "model"),
        (SamplingParams(temperature=1.0), 3, "ngram"),  # deterministic proposals: q is a one-hot
    ],
    ids=["t1-k2", "t0.8-topk-topp-k1", "ngram-k3"],
)
def test_speculative_sampling_matches_target_distribution(pair, sampling, draft_tokens, draft_kind):
    target, model_draft = pair
    draft = model_draft if draft_kind == "model" else NgramDraft(max_ngram=1)
    joint12, p3 = exact_distributions(target, sampling)
    c12, c3, acceptance = sample_runs(target, draft, sampling, draft_tokens)
    assert 0.05 < acceptance < 0.9  # the draft is often wrong, yet some proposals are kept
    assert chi2_pvalue(c12, joint12) > 1e-3
    assert chi2_pvalue(c3, p3) > 1e-3
    if draft_kind == "model":  # the test's power: the draft's own distribution is clearly rejected
        with torch.no_grad():
            q1 = logits_to_probs(model_draft(torch.tensor([PROMPT]))[0, -1], sampling)
        assert chi2_pvalue(c12.sum(1), q1) < 1e-6


def _accept_always(p, q, drafts, generator=None):
    """Plain draft acceptance: every proposal is kept."""
    n = len(drafts)
    return n, int(torch.multinomial(p[n], 1, generator=generator))


def _no_residual(p, q, drafts, generator=None):
    """The min(1, p/q) acceptance test without the residual correction: a rejection resamples from p."""
    n, tok = _exact(p, q, drafts, generator)
    return n, (tok if n == len(drafts) else int(torch.multinomial(p[n], 1, generator=generator)))


@pytest.mark.parametrize("biased", [_accept_always, _no_residual], ids=["accept-always", "no-residual"])
def test_biased_samplers_fail_the_same_test(pair, monkeypatch, biased):
    target, draft = pair
    sampling = SamplingParams(temperature=1.0)
    joint12, p3 = exact_distributions(target, sampling)
    monkeypatch.setattr(verify, "rejection_sample", biased)
    c12, c3, _ = sample_runs(target, draft, sampling, draft_tokens=2)
    assert min(chi2_pvalue(c12, joint12), chi2_pvalue(c3, p3)) < 1e-6
