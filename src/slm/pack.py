"""Inference packing: oneDNN's prepacked weights for batch-1 decoding on CPU, an explicit step
beside the model, like `slm.quantize`.

Why: at batch 1 a decode step is a GEMV per layer and a speculative verify is a GEMM of
K+1 <= ~9 rows, both bound by reading the weight. MKL's sgemm handles these small shapes poorly
(2-9 rows cost ~2x one row); oneDNN with a weight reordered once for small batches streams it at
2-3x MKL's speed, and 5 rows cost ~1.2x one row (benchmarks/README.md). `slm.generate` packs the
models it decodes with; scoring (`slm.eval`) does not, since the reordered kernels round differently.

A packed layer is a second copy of its weight. It remembers which tensor it was made from (its
identity, storage and version counter) and refuses to run once that tensor changed, instead of
silently multiplying by the old weights: call `pack` again after changing them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slm.errors import SlmError

# The reorder is tuned for a batch of 8 rows: as fast as 1 row for GEMVs, and fast for verify.
_BATCH_HINT = 8


def _stamp(weight: torch.Tensor) -> tuple:
    """What identifies the weight's current values: the tensor, its storage, its in-place writes."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor keeps no version counter (and cannot be written in place)
        version = None
    return id(weight), weight.data_ptr(), version


def can_pack(linear: nn.Module) -> bool:
    w = getattr(linear, "weight", None)
    return (
        isinstance(linear, nn.Linear) and linear.bias is None and w.device.type == "cpu" and w.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameter, same state_dict) that runs from a oneDNN-prepacked copy of its
    weight when no gradient is recorded; with autograd on, it is a plain linear (training never
    sees the copy)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared, not copied
        self.register_parameter("bias", None)
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _BATCH_HINT)
        self.stamp = _stamp(self.weight)

    @property
    def stale(self) -> bool:
        return _stamp(self.weight) != self.stamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, self.weight)
        if self.stale:
            raise SlmError(
                "the model's weights changed after slm.pack.pack() made its packed copy; pack it again "
                "(or unpack it) before running it"
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def _swap(model: nn.Module, make) -> None:
    for name, m in list(model.named_modules()):
        if not name:
            continue
        new = make(m)
        if new is not m:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def pack(model: nn.Module) -> nn.Module:
    """Pack every fp32 CPU linear of `model` in place (others are left as they are); re-pack the
    ones whose weights changed since. Cheap when nothing changed: generate calls it every time."""

    def make(m):
        if isinstance(m, PackedLinear) and not m.stale:
            return m
        return PackedLinear(m) if can_pack(m) else m

    _swap(model, make)
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Drop the packed copies: every PackedLinear becomes a plain nn.Linear over the same weight."""

    def make(m):
        if not isinstance(m, PackedLinear):
            return m
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        plain.weight = m.weight
        return plain

    _swap(model, make)
    return model


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
