"""KV-cached generation: an explicit prefill, then one decode step per token."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from slm.errors import SlmError
from slm.model import Transformer
from slm.sampling import SamplingParams, next_token


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens only (a stop token, if hit, is included)
    prompt_tokens: int
    seconds: float  # wall time of prefill + decode
    prefill_seconds: float
    stop_reason: str  # "eos", "stop" (should_stop said so), "length" (max_new_tokens), "context" (model context full)
    stats: dict = field(default_factory=dict)  # extra counters (speculative decoding fills these)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def check_prompt(model: Transformer, prompt: Sequence[int]) -> None:
    n, ctx = len(prompt), model.config.max_seq_len
    if n == 0:
        raise SlmError("the prompt is empty (0 tokens)")
    if n >= ctx:
        raise SlmError(f"the prompt has {n} tokens, but the model's context is {ctx}: no room to generate")
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise SlmError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {vocab})")


def ensure_cache(model: Transformer, length: int) -> None:
    """Give `model` a batch-1 KV cache of at least `length` positions (reused across calls)."""
    if model.cache_len < length:
        model.setup_cache(batch_size=1, max_seq_len=length)


def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Write (T,) tokens into the cache at start_pos.. and return the last position's logits (V,)."""
    pos = torch.arange(start_pos, start_pos + tokens.numel(), device=tokens.device)
    return model(tokens.view(1, -1), pos, logits_to_keep=1)[0, -1]


def decode_step(model: Transformer, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One token (a 0-d or (1,) tensor) at position `pos` ((1,) tensor) -> logits (V,)."""
    return model(token.view(1, 1), pos)[0, -1]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    *,
    stop_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` (batch 1).

    stop_ids: token ids that end generation (default: the model's EOS).
    should_stop: called with the new tokens so far after each token; True ends generation
        (stop sequences in text are checked this way).
    on_token: called with each new token as soon as it exists (streaming).
    """
    if max_new_tokens < 0:
        raise SlmError(f"max-new-tokens must be >= 0, got {max_new_tokens}")
    check_prompt(model, prompt)
    if stop_ids is None:
        stop_ids = () if model.config.eos_id is None else (model.config.eos_id,)
    stop = set(stop_ids)
    device = model.tok_embeddings.weight.device
    budget = min(max_new_tokens, model.config.max_seq_len - len(prompt))
    ensure_cache(model, len(prompt) + budget)

    t0 = time.perf_counter()
    new: list[int] = []
    reason = "length" if budget == max_new_tokens else "context"
    if budget > 0:
        logits = prefill(model, torch.tensor(prompt, device=device))
    prefill_s = time.perf_counter() - t0
    pos = torch.tensor([len(prompt)], device=device)
    for i in range(budget):
        tok = next_token(logits, sampling, generator)
        t = int(tok)
        new.append(t)
        if on_token is not None:
            on_token(t)
        if t in stop:
            reason = "eos"
            break
        if should_stop is not None and should_stop(new):
            reason = "stop"
            break
        if i + 1 < budget:  # the last token's logits are never needed
            logits = decode_step(model, tok, pos)
            pos += 1
    return GenerationResult(new, len(prompt), time.perf_counter() - t0, prefill_s, reason)
