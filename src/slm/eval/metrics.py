"""Aggregating per-item scores into a task's metrics and standard errors, as lm-evaluation-harness does.

`acc`/`acc_norm`: the mean, with `mean_stderr` (sample standard deviation / sqrt(n)).
`perplexity`: exp(-mean log-likelihood), with lm_eval's bootstrap standard error: `iters`
resamples in chunks of 1000, chunk i drawn by `random.Random(i).choices(xs, k=n)`. We replay
exactly those draws, vectorised: numpy's legacy MT19937 given Python's generator state yields the
same doubles (both use the 53-bit `genrand_res53`), and `choices` picks `floor(random() * n)`.
"""

from __future__ import annotations

import math
import random

import numpy as np


def mean(xs) -> float:
    return sum(xs) / len(xs)


def sample_stddev(xs) -> float:
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs) -> float:
    return sample_stddev(xs) / math.sqrt(len(xs))


def perplexity(lls) -> float:
    return math.exp(-mean(lls))


def _python_random_as_numpy(seed: int) -> np.random.RandomState:
    """A numpy generator that produces the same `random()` stream as `random.Random(seed)`."""
    _version, internal, _gauss = random.Random(seed).getstate()
    rs = np.random.RandomState()
    rs.set_state(("MT19937", np.array(internal[:-1], dtype=np.uint32), internal[-1], 0, 0.0))
    return rs


def perplexity_stderr(lls, iters: int = 100_000) -> float:
    """lm_eval's `bootstrap_stderr(perplexity, lls, iters)`, draw for draw."""
    xs = np.asarray(lls, dtype=np.float64)
    n = len(xs)
    chunk = min(1000, iters)
    replicates = []
    for i in range(iters // chunk):
        rs = _python_random_as_numpy(i)
        for _ in range(chunk):
            idx = np.floor(rs.random_sample(n) * n).astype(np.int64)
            replicates.append(math.exp(-(xs[idx].sum() / n)))
    return sample_stddev(replicates)  # the spread of the resampled statistic itself


def aggregate(metric: str, values: list[float], bootstrap_iters: int = 100_000) -> tuple[float, float | None]:
    """(value, standard error); the error is None for a single item, as lm_eval's "N/A"."""
    if metric == "perplexity":
        value = perplexity(values)
        stderr = perplexity_stderr(values, bootstrap_iters) if len(values) > 1 and bootstrap_iters > 0 else None
    else:
        value = mean(values)
        stderr = mean_stderr(values) if len(values) > 1 else None
    return value, stderr
