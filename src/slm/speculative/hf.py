"""A `transformers` causal LM as a CachedLM: AMD's setup (our 135M draft in front of a
transformers target such as CodeLlama-7b), or a transformers draft in front of our target.

Rollback is `DynamicCache.crop(-n)`: everything at or beyond the positions being
written is dropped before the forward, so the HF cache behaves like our by-position cache.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from slm.errors import SlmError


class HFLM:
    """Wraps a loaded `transformers` causal LM (batch 1, fp32 logits)."""

    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_seq_len = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        eos = getattr(cfg, "eos_token_id", None)
        self.eos_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        self.device = next(model.parameters()).device
        self.cache = None
        # transformers 5 renamed `past_key_values` to `cache`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def prepare(self, length: int) -> None:
        from transformers import DynamicCache

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


def load_hf_lm(path: str | os.PathLike) -> HFLM:
    """Load a local transformers causal-LM directory (safetensors only, fp32, nothing downloaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SlmError(f"{path}: not a transformers model directory (no config.json)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SlmError("transformers models need the 'hf' extra: pip install 'slm[hf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise SlmError(f"{path}: transformers cannot load this model ({str(e).splitlines()[0]})") from None
    return HFLM(model)
