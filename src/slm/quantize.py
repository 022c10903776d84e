"""Opt-in int8 inference: every linear layer (lm_head included) with per-output-channel symmetric
int8 weights. And `draft_copy`, a cheaper copy for speculative drafting: the decoder layers in
groupwise int4, the lm_head in int8.

Why: batch-1 decoding is bound by reading the weights, and int8 reads 4x fewer bytes than fp32.

Two kernels run these layers. Decoding uses slm's native kernels (`slm.native`), which round the
activations to int8 in blocks of 32 (one scale per block, as llama.cpp's Q8_0 does) and take
integer dot products: the per-block scales hold SmolLM2's outlier channels (one scale per tensor,
as FBGEMM's dynamic quantisation uses, wrecks it: perplexity x4), and the perplexity cost is
measured through that path (`benchmarks/perplexity.py`, `tests/test_native.py`). The layers' own
`forward` (scoring, prefill, machines without the native kernels) runs PyTorch's
`aten._weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` with bf16 activations (~0.2% relative
error per element); held-out perplexity through it is checked in tests/test_quantize.py.
"""

from __future__ import annotations

import torch
from torch import nn

from slm.model import Transformer
from slm.weights import build_model


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


def _replace_linears(model: Transformer, make) -> Transformer:
    """Replace every nn.Linear of `model` (in place) by make(name, weight)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, linear.weight))
    return model


def quantize_int8(model: Transformer) -> Transformer:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear; embeddings and norms stay fp32."""
    return _replace_linears(model, lambda name, weight: Int8Linear.from_float(weight))


def _shared_copy(model: Transformer) -> Transformer:
    """A second Transformer over the same tensors: build_model adopts them (no copy), so only the
    linears the caller then replaces (and the copy's own KV cache) cost memory."""
    shared = {k: v for k, v in model.state_dict().items()}
    return build_model(model.config, shared, device=model.tok_embeddings.weight.device)


def quantized_copy(model: Transformer) -> Transformer:
    """An int8 copy of `model` for use beside it (e.g. as its speculative draft).

    The copy shares the embeddings and norms with `model` (no second fp32 copy) and owns only
    its int8 linears and its own KV cache; `model` itself is left unchanged."""
    return quantize_int8(_shared_copy(model))


class Int4Linear(nn.Module):
    """y = x W^T with W in groupwise asymmetric 4-bit (llama.cpp's Q4_1 layout): each run of
    `GROUP` (32) input weights of a row has an fp16 scale and min, W ~= q * scale + min, q in 0..15.
    Half the bytes of int8, but coarser: fine for a speculative draft's decoder layers (the target
    checks every token), not for the lm_head (see `draft_copy`).

    codes (out, in/2) uint8: byte j of a group holds element j (low nibble) and element j + 16 (high
    nibble); scale_min (out, 2, in/32) fp16: a row's scales, then its mins. slm's native kernels (`slm.native`) read this layout (rows interleaved in groups); without them the layer
    runs PyTorch's `_weight_int4pack_mm_for_cpu` (bf16 activations) on a copy it makes once in that
    kernel's own layout (W = (q - 8) * scale + zero with bf16 scale and zero: rounds slightly differently)."""

    GROUP = 32

    def __init__(self, codes: torch.Tensor, scale_min: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)  # (out, in/2) uint8
        self.register_buffer("scale_min", scale_min)  # (out, 2, in/32) fp16: each row's scales, then its mins
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self._torch_packed = None

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        out_features, in_features = weight.shape
        return (out_features % 16 == 0 and in_features % Int4Linear.GROUP == 0 and weight.device.type == "cpu"
                and in_features <= 512 * Int4Linear.GROUP)  # the native kernels' MAX_BLOCKS

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor) -> "Int4Linear":
        out_features, in_features = weight.shape
        g = cls.GROUP
        groups = weight.detach().float().reshape(out_features, in_features // g, g)  # (out, in/g, g)
        lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        # Scale and min are rounded to fp16 first, so that the codes fit the values the kernels use.
        scale = ((hi - lo) / 15).clamp(min=1e-6).half().float()
        mn = lo.half().float()
        q = ((groups - mn) / scale).round().clamp(0, 15).to(torch.uint8)  # (out, in/g, g)
        codes = q[..., : g // 2] | (q[..., g // 2 :] << 4)  # (out, in/g, g/2)
        scale_min = torch.stack([scale[..., 0], mn[..., 0]], dim=1).half()  # (out, 2, in/g)
        return cls(codes.reshape(out_features, in_features // 2).contiguous(), scale_min.contiguous())

    def codes_unpacked(self) -> torch.Tensor:
        """q (out, in) in 0..15."""
        c = self.codes.view(self.out_features, -1, self.GROUP // 2)  # (out, in/g, g/2)
        return torch.cat([c & 0x0F, c >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by (in the native kernels), as fp32 (out, in)."""
        q = self.codes_unpacked().float().view(self.out_features, -1, self.GROUP)  # (out, in/g, g)
        sm = self.scale_min.float()  # (out, 2, in/g)
        return (q * sm[:, 0, :, None] + sm[:, 1, :, None]).reshape(self.out_features, self.in_features)

    def _torch_layout(self):
        if self._torch_packed is None:
            q = self.codes_unpacked().to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            sm = self.scale_min.float()  # (out, 2, in/g)
            zeros = sm[:, 1] + 8 * sm[:, 0]  # W = (q - 8) * scale + zero
            sz = torch.stack([sm[:, 0], zeros], dim=-1)  # (out, in/g, 2)
            self._torch_packed = (packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16))
        return self._torch_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        packed, sz = self._torch_layout()
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.GROUP, sz)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.GROUP}"


def _int4_layers(name: str, weight: torch.Tensor) -> nn.Module:
    """Decoder-layer linears in int4 (groups of 32; int8 where the int4 kernel's shape rules do not
    allow it), the lm_head in int8."""
    if name.startswith("layers.") and Int4Linear.supports(weight):
        return Int4Linear.from_float(weight)
    return Int8Linear.from_float(weight)


def quantize_int4(model: Transformer) -> Transformer:
    """Replace `model`'s linears (in place) as `draft_copy` does: int4 decoder layers, int8 lm_head.
    Its perplexity cost against fp32 and int8 is measured by benchmarks/perplexity.py."""
    return _replace_linears(model, _int4_layers)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}  # `--quantize` choices


def draft_copy(model: Transformer) -> Transformer:
    """A copy of `model` to draft for it in speculative decoding, quantised as `quantize_int4`.
    Shares the embeddings and norms with `model`, like `quantized_copy`.

    Measured on SmolLM2-135M-Instruct (1 thread, benchmarks/README.md): a decode step costs
    ~0.49 of fp32's (int8 everywhere: ~0.66) and its next token agrees with fp32's 98% of the
    time on HumanEval completions (int4 everywhere: 90%: the lm_head is what int4 hurts)."""
    return quantize_int4(_shared_copy(model))
