"""Opt-in int8 inference: every linear layer (lm_head included) with per-output-channel symmetric
int8 weights ("weight-only": activations are not quantised).

Why: batch-1 decoding is bound by reading the weights, and int8 reads 4x fewer bytes than fp32.

The kernel is `aten._weight_int8pack_mm`, which takes bf16 activations on CPU (with fp32 ones
it falls back to a slow path, ~30x slower here). Rounding the activation to bf16 costs ~0.2%
relative error per element, spread evenly; quantising the activations to int8 instead (FBGEMM's
dynamic `quantized::linear_dynamic`, as `torch.ao` dynamic quantisation does) is faster still
but wrecks SmolLM2 (perplexity x4: the SwiGLU output has outlier channels that one per-tensor
scale cannot hold). Measured in benchmarks/README.md; held-out perplexity is checked against
fp32 in tests/test_quantize.py.
"""

from __future__ import annotations

import torch
from torch import nn

from slm.model import Transformer


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 per output channel (scale = max|W_row| / 127, kept in bf16)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bf16
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor) -> "Int8Linear":
        w = weight.detach().float().contiguous()  # the kernel wants row-major (out, in), whatever the source layout
        # Round the scales to bf16 first, so that W ~= qweight * scales holds for the scales the kernel uses.
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8).to(torch.bfloat16)  # (out,)
        qweight = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(qweight, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scales)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, as fp32 (out, in)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: Transformer) -> Transformer:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear; embeddings and norms stay fp32."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_float(linear.weight))
    return model


def quantized_copy(model: Transformer) -> Transformer:
    """An int8 copy of `model` for use beside it (e.g. as its speculative draft).

    The copy shares the embeddings and norms with `model` (no second fp32 copy) and owns only
    its int8 linears and its own KV cache; `model` itself is left unchanged."""
    from slm.weights import build_model

    # build_model adopts the given tensors (no copy); the linears are then replaced by int8 ones.
    shared = {k: v for k, v in model.state_dict().items()}
    copy = build_model(model.config, shared, device=model.tok_embeddings.weight.device)
    return quantize_int8(copy)
