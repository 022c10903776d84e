"""Where slm keeps its caches and work directories."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$SLM_CACHE, else $XDG_CACHE_HOME/slm, else ~/.cache/slm."""
    if os.environ.get("SLM_CACHE"):
        return Path(os.environ["SLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slm"
