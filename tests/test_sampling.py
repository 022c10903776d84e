"""Logits processing against transformers' own warpers, and parameter validation."""

from __future__ import annotations

import pytest
import torch

from slm.errors import SlmError
from slm.sampling import SamplingParams, logits_to_probs, next_token, sample

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def reference_probs(logits, params):
    scores = logits.clone()
    scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k is not None:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p is not None:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.5),
        SamplingParams(temperature=1.0, top_p=1.0),
    ],
)
def test_probs_match_transformers_warpers(params):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(logits_to_probs(logits, params), reference_probs(logits, params), rtol=0, atol=1e-6)


def test_greedy_is_one_hot_argmax():
    logits = torch.randn(3, 50)
    probs = logits_to_probs(logits, SamplingParams())
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.all(probs.sum(-1) == 1)
    assert torch.equal(next_token(logits, SamplingParams()), logits.argmax(-1))


def test_sample_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    draws = sample(probs.expand(20000, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_k=0), "top-k"),
        (dict(temperature=1.0, top_p=0.0), "top-p"),
        (dict(temperature=1.0, top_p=1.5), "top-p"),
    ],
)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(SlmError, match=message):
        SamplingParams(**kwargs)


def test_argmax_is_torchs_on_ties_nan_infinities_and_strided_rows():
    """The numpy-backed `argmax` (greedy decoding's, verification's) gives torch's argmax: same index on
    ties (the first), on NaN, on all -inf, on strided and transposed rows, same dtype and shape."""
    from slm.sampling import argmax

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(49152, generator=g), torch.randn(5, 300, generator=g), torch.tensor([1.0, 3.0, 3.0, 2.0]),
             torch.full((3,), float("-inf")), torch.tensor([1.0, float("nan"), 5.0, float("nan")]),
             torch.randn(4, 10, generator=g)[:, ::2], torch.randn(3, 7, generator=g).t(),
             torch.randn(2, 6, generator=g).double(), torch.randn(2, 6, generator=g).bfloat16()]
    for x in cases:
        got, want = argmax(x), x.argmax(-1)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), x
    with torch.inference_mode():
        x = torch.randn(3, 9, generator=g)
        assert torch.equal(argmax(x), x.argmax(-1))
