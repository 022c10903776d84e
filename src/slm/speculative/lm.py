"""The one interface the decoding loop needs from a language model, and its two adapters.

A `CachedLM` runs one sequence at a time over a KV cache written by position:
`forward(tokens, start_pos)` scores `tokens` placed at positions start_pos.. and leaves
their keys/values in the cache; whatever the cache held at positions >= start_pos before
is forgotten. That is all speculative decoding asks: rejected draft positions are simply
written over in the next round. slm's own `Transformer` does this natively (its static
cache is written by position, `SlmLM`); `HFLM` does it for a `transformers` model by
cropping its DynamicCache.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from slm.model import Transformer
from slm.native import decoder


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


def ensure_cache(model: Transformer, length: int) -> None:
    """Give `model` a batch-1 KV cache of at least `length` positions (reused across calls)."""
    if model.cache_len < length:
        model.setup_cache(batch_size=1, max_seq_len=length)


class SlmLM:
    """An slm `Transformer` as a CachedLM (batch 1, its own static KV cache), run by `slm.native.decoder`:
    the native kernels for decode and verify steps where they build, else the packed model."""

    def __init__(self, model: Transformer):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = model.config.max_seq_len
        self.eos_id = model.config.eos_id
        self.device = model.tok_embeddings.weight.device
        self.run = None  # decoder(model), made by prepare() (SelfDraft: its reset) or the first forward

    def prepare(self, length: int) -> None:
        ensure_cache(self.model, min(length, self.max_seq_len))
        self.run = decoder(self.model)  # after the cache: the native decoder binds to it

    @torch.inference_mode()
    def forward(self, tokens: list[int], start_pos: int, last_only: bool = False) -> torch.Tensor:
        ids = torch.tensor(tokens, device=self.device).view(1, -1)  # (1, T)
        pos = torch.arange(start_pos, start_pos + len(tokens), device=self.device)  # (T,)
        if self.run is None:
            self.run = decoder(self.model)
        return self.run(ids, pos, logits_to_keep=1 if last_only else 0)[0].float()  # (T', V)


class HFLM:
    """A loaded `transformers` causal LM as a CachedLM (batch 1, fp32 logits): AMD's setup (our
    135M draft in front of a transformers target such as CodeLlama-7b), or a transformers draft
    in front of our target. Rollback is `DynamicCache.crop(-n)`: everything at or beyond the
    positions being written is dropped before the forward, so the HF cache behaves like ours."""

    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_seq_len = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.eos_id = eos_id(model)
        self.device = next(model.parameters()).device
        self.cache = None
        # transformers 5 renamed `past_key_values` to `cache`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def prepare(self, length: int) -> None:
        from transformers import DynamicCache  # optional dependency: only transformers models get here

        self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, tokens: list[int], start_pos: int, last_only: bool = False) -> torch.Tensor:
        cached = self.cache.get_seq_length()
        if cached > start_pos:
            self.cache.crop(start_pos - cached)  # negative: drop that many trailing (rejected) positions
        elif cached < start_pos:  # a DynamicCache cannot hold gaps; the loop never asks for one
            raise RuntimeError(f"HF cache holds {cached} positions, cannot write at {start_pos}")
        ids = torch.tensor([tokens], device=self.device)  # (1, T)
        pos = torch.arange(start_pos, start_pos + len(tokens), device=self.device)  # (T,)
        out = self.model(
            input_ids=ids, position_ids=pos[None], use_cache=True, logits_to_keep=1 if last_only else 0,
            **{self._cache_arg: self.cache},
        )
        return out.logits[0].float()  # (T', V)


def is_transformers_model(model) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "generation_config")


def eos_id(model) -> int | None:
    """The end-of-sequence id of an slm Transformer, a transformers model or a CachedLM."""
    if isinstance(model, Transformer):
        return model.config.eos_id
    if is_transformers_model(model):
        eos = getattr(model.config, "eos_token_id", None)
        return eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return getattr(model, "eos_id", None)


def as_lm(model) -> CachedLM:
    """An slm Transformer, a transformers causal LM, or anything already a CachedLM -> CachedLM."""
    if isinstance(model, Transformer):
        return SlmLM(model)
    if isinstance(model, CachedLM):
        return model
    if is_transformers_model(model):
        return HFLM(model)
    raise TypeError(f"expected an slm Transformer, a transformers causal LM or a CachedLM, got {type(model).__name__}")
