"""slm: an open small-language-model stack (LLaMA-2 architecture) in PyTorch."""

__version__ = "0.1.0"
