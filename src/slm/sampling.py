"""Logits processing and sampling: temperature, top-k, top-p.

`logits_to_probs` is the single definition of "the distribution we sample from";
plain generation and speculative decoding (target and draft alike) both use it, so
speculative sampling is exact with respect to exactly this distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slm.errors import SlmError


# Below this, logits / temperature overflow float32 (inf - inf = NaN probabilities); 0 means greedy.
MIN_TEMPERATURE = 1e-4
# A smaller top-p rounds to 0 in float32, where the nucleus is computed.
MIN_TOP_P = torch.finfo(torch.float32).tiny
# torch.Generator.manual_seed takes a 64-bit seed.
_SEED_RANGE = (-(2**63), 2**64 - 1)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded torch.Generator; refuses a seed torch cannot take (instead of an overflow traceback)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise SlmError(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}")
    return torch.Generator(device).manual_seed(seed)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise SlmError(f"temperature must be a finite number >= 0, got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise SlmError(f"temperature {t!r} is below {MIN_TEMPERATURE} (the logits would overflow); use 0 for greedy")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise SlmError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SlmError(f"top-p must be in (0, 1], got {self.top_p!r}")
        if self.top_p is not None and self.top_p < MIN_TOP_P:
            raise SlmError(f"top-p {self.top_p!r} is below the smallest float32 ({MIN_TOP_P:.3g}); "
                           "a top-p that small keeps only the most likely token (use temperature 0)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) fp32 probabilities after temperature, top-k, top-p (in that order,
    as transformers applies them). Greedy gives the one-hot of the argmax."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays (a tiny top_p rounds to 0 in fp32)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from (..., V) probabilities -> (...,) long."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) (the first maximum on ties, as torch's), through numpy for CPU fp32: its vectorised
    argmax is 4-5x faster than torch's over a 49k vocabulary (`benchmarks/overheads.py`: 25 against 108 us
    a call), once per token of greedy decoding, per drafted token and per verified position."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.layout == torch.strided:
        return torch.as_tensor(x.detach().numpy().argmax(-1))
    return x.argmax(-1)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) logits -> (...,) next token ids."""
    if params.greedy:  # skip building the one-hot
        return argmax(logits)
    return sample(logits_to_probs(logits, params), generator)
