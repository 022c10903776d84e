"""Where slm keeps its caches and work directories, and the content hash that identifies a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """$SLM_CACHE, else $XDG_CACHE_HOME/slm, else ~/.cache/slm."""
    if os.environ.get("SLM_CACHE"):
        return Path(os.environ["SLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slm"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
