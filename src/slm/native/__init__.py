"""slm's native decode kernels: `decoder(model)` runs cached forwards of a model in them when this
machine can build them (a C++ compiler; AVX2 for full speed), else in PyTorch (`slm.pack`)."""

from slm.native.build import library
from slm.native.engine import MAX_ROWS, NativeDecoder, decode_logits, decoder

__all__ = ["MAX_ROWS", "NativeDecoder", "decode_logits", "decoder", "library"]
