"""Training checkpoints: atomic on disk, newest-complete on resume, the last K kept.

A checkpoint is a directory `RUN_DIR/checkpoints/step_00001000/` holding

    model.safetensors   full (unsharded) model state, slm tensor names
    optimizer.pt        AdamW state keyed by parameter name (our own file: torch.load(weights_only=True))
    rng.pt              python / numpy / torch / cuda RNG states, one entry per rank
    state.json          step, data-loader state, world size, global batch, resolved config, tokenizer hash
    COMPLETE            written last; a directory without it is never read

It is written into `checkpoints/.tmp-step_00001000-<pid>/`, every file fsynced, the marker
written, then the directory renamed into place (a rename within one filesystem is atomic)
and the parent fsynced. A crash at any point leaves either the previous checkpoints
untouched or a `.tmp-*` directory that resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slm.errors import SlmError

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)$")
# Test hook: make the writer die (as SIGKILL would) after the model file of this step is written.
CRASH_ENV = "SLM_TEST_CRASH_IN_CHECKPOINT_AT_STEP"


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    rng: list[dict]  # per rank
    state: dict  # state.json


# --- small atomic-write helpers ------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- RNG states --------------------------------------------------------------------------


def capture_rng() -> dict:
    """Every RNG this process may draw from, as tensors / plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing -------------------------------------------------------------------------------


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one, record the alias."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    rng_states: list[dict],
    state: dict,
    keep_last: int,
) -> Path:
    """Write one checkpoint atomically (call on one process only) and prune to the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, aliases = _dedupe_shared(model_state)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    _fsync_file(tmp / "model.safetensors")
    if os.environ.get(CRASH_ENV) == str(step):
        os._exit(17)  # simulate a kill mid-write: no optimizer, no marker, no rename
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, **state}, indent=2))
    for name in ("optimizer.pt", "rng.pt", "state.json"):
        _fsync_file(tmp / name)
    (tmp / MARKER).write_text(f"{step}\n")
    _fsync_file(tmp / MARKER)
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (e.g. resumed after a crash past it): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crashed writer (ours is already renamed)
        shutil.rmtree(stale, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (its newest complete checkpoint) or one checkpoint directory."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if (path / "model.safetensors").is_file() and (path / "state.json").is_file():
        raise SlmError(f"{path}: checkpoint is incomplete (no {MARKER} marker); it was not finished writing")
    latest = latest_checkpoint(path)
    if latest is None:
        raise SlmError(f"{path}: not a run directory with a complete checkpoint, nor a checkpoint directory")
    return latest


def read_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlmError(f"{path}/state.json: cannot read checkpoint state ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise SlmError(f"{path}: checkpoint format {state.get('format_version')}, this slm reads {FORMAT_VERSION}")
    return state


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    f = Path(path) / "model.safetensors"
    try:
        with safe_open(str(f), framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
            aliases = json.loads((st.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise SlmError(f"{f}: cannot read checkpoint weights ({e})") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    state = read_state(path)
    try:
        optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as e:
        raise SlmError(f"{path}: cannot read checkpoint optimizer/RNG state ({e})") from None
    return Checkpoint(path, state["step"], read_model_state(path), optimizer, rng, state)
