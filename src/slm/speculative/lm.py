"""The one interface the draft/verify loop needs from a language model, and its slm adapter.

A `CachedLM` runs one sequence at a time over a KV cache written by position:
`forward(tokens, start_pos)` scores `tokens` placed at positions start_pos.. and leaves
their keys/values in the cache; whatever the cache held at positions >= start_pos before
is forgotten. That is all speculative decoding asks: rejected draft positions are simply
written over in the next round. slm's own `Transformer` does this natively (its static
cache is written by position); `slm.speculative.hf.HFLM` does it for a `transformers`
model by cropping its DynamicCache.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from slm.generate import ensure_cache
from slm.model import Transformer


@runtime_checkable
class CachedLM(Protocol):
    vocab_size: int  # logits width
    max_seq_len: int  # positions the model can hold
    eos_id: int | None

    def prepare(self, length: int) -> None:
        """Start a new sequence of up to `length` positions."""

    def forward(self, tokens: list[int], start_pos: int, last_only: bool = False) -> torch.Tensor:
        """Score `tokens` at positions start_pos..start_pos+T-1 -> logits (T, V) fp32, or (1, V) if last_only.
        Positions < start_pos must already be cached by earlier calls of this sequence."""


class SlmLM:
    """An slm `Transformer` as a CachedLM (batch 1, its own static KV cache)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = model.config.max_seq_len
        self.eos_id = model.config.eos_id
        self.device = model.tok_embeddings.weight.device

    def prepare(self, length: int) -> None:
        ensure_cache(self.model, min(length, self.max_seq_len))

    @torch.inference_mode()
    def forward(self, tokens: list[int], start_pos: int, last_only: bool = False) -> torch.Tensor:
        ids = torch.tensor(tokens, device=self.device).view(1, -1)  # (1, T)
        pos = torch.arange(start_pos, start_pos + len(tokens), device=self.device)  # (T,)
        return self.model(ids, pos, logits_to_keep=1 if last_only else 0)[0].float()  # (T', V)


def as_lm(model) -> CachedLM:
    """An slm Transformer, a transformers causal LM, or anything already a CachedLM -> CachedLM."""
    if isinstance(model, Transformer):
        return SlmLM(model)
    if isinstance(model, CachedLM):
        return model
    if isinstance(model, torch.nn.Module) and hasattr(model, "generation_config"):
        from slm.speculative.hf import HFLM

        return HFLM(model)
    raise TypeError(f"expected an slm Transformer, a transformers causal LM or a CachedLM, got {type(model).__name__}")
