"""Training checkpoints: atomic on disk, newest-complete on resume, the last K kept.

A checkpoint is a directory `RUN_DIR/checkpoints/step_00001000/` holding

    model.safetensors   full (unsharded) model state, slm tensor names
    optimizer.pt        AdamW state keyed by parameter name (our own file: torch.load(weights_only=True))
    rng.pt              python / numpy / torch / cuda RNG states, one entry per rank
    state.json          step, data-loader state, world size, global batch, resolved config, tokenizer hash
    checksums.json      sha256 of the four files above, verified before a checkpoint is used
    COMPLETE            written last; a directory without it is never read

It is written into a temporary directory beside it (`slm.atomic.atomic_dir`), every file fsynced,
the marker written, then the directory renamed into place (a rename within one filesystem is
atomic) and the parent fsynced. A crash at any point leaves either the previous checkpoints
untouched or a temporary directory that resume ignores and the next save removes. A checkpoint
whose files no longer match their checksums (a flipped bit) is skipped on resume, with a note on
stderr, in favour of the newest one that verifies.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slm.atomic import atomic_dir, sweep_stale, write_json, write_text
from slm.errors import SlmError
from slm.paths import file_sha256

MARKER = "COMPLETE"
CHECKSUMS = "checksums.json"
_CHECKED = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")
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
    final = root / f"step_{step:08d}"
    # A re-run of the same step (e.g. resumed after a crash past it) replaces it.
    with atomic_dir(final, lambda p: _STEP_DIR.match(p.name) is not None, "checkpoint") as tmp:
        tensors, aliases = _dedupe_shared(model_state)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        if os.environ.get(CRASH_ENV) == str(step):
            os._exit(17)  # simulate a kill mid-write: no optimizer, no marker, no rename
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        write_json(tmp / "state.json", {"format_version": FORMAT_VERSION, "step": step, **state})
        write_json(tmp / CHECKSUMS, {name: file_sha256(tmp / name) for name in _CHECKED})
        write_text(tmp / MARKER, f"{step}\n")
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    sweep_stale(root)  # temporary directories of crashed writers (ours is already renamed)


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


def verify_checkpoint(path: Path) -> str | None:
    """None if every file of the checkpoint matches checksums.json, else what is wrong."""
    if not (path / CHECKSUMS).exists() and (path / MARKER).is_file():
        # Written by an slm from before checksums: complete (it has its marker), but unverifiable.
        # Refusing it would strand every older run; say so instead.
        print(f"slm: note: checkpoint {path} predates checksums; its files cannot be verified", file=sys.stderr)
        return None
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {CHECKSUMS} ({type(e).__name__})"
    if not isinstance(sums, dict) or set(sums) != set(_CHECKED):
        return f"{CHECKSUMS} does not list {', '.join(_CHECKED)}"
    for name in _CHECKED:
        try:
            ok = file_sha256(path / name) == sums[name]
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
        if not ok:
            return f"{name} does not match its checksum (corrupted on disk)"
    return None


def verified_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run whose files verify; each newer one that does not is
    named on stderr (a resume from an older checkpoint must not go unnoticed)."""
    for c in reversed(complete_checkpoints(run_dir)):
        problem = verify_checkpoint(c)
        if problem is None:
            return c
        print(f"slm: skipping checkpoint {c}: {problem}", file=sys.stderr)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (its newest complete checkpoint that verifies) or one checkpoint directory."""
    path = Path(path)
    if (path / MARKER).is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise SlmError(f"{path}: {problem}")
        return path
    if (path / "model.safetensors").is_file() and (path / "state.json").is_file():
        raise SlmError(f"{path}: checkpoint is incomplete (no {MARKER} marker); it was not finished writing")
    if latest_checkpoint(path) is None:
        raise SlmError(f"{path}: not a run directory with a complete checkpoint, nor a checkpoint directory")
    found = verified_checkpoint(path)
    if found is None:
        raise SlmError(f"{path}: no checkpoint matches its checksums (all corrupted)")
    return found


# state.json fields a resume reads, with their types.
_STATE_FIELDS = {"step": int, "loader": dict, "world_size": int, "global_batch": int, "model_config": dict}


def read_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    f = path / "state.json"
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise SlmError(f"{f}: cannot read checkpoint state ({e})") from None
    if not isinstance(state, dict):
        raise SlmError(f"{f}: expected a JSON object")
    if state.get("format_version") != FORMAT_VERSION:
        raise SlmError(f"{path}: checkpoint format {state.get('format_version')}, this slm reads {FORMAT_VERSION}")
    return state


def check_resume_state(c: Checkpoint) -> None:
    """Refuse a checkpoint whose state.json or rng.pt lacks what a resume reads (a hand-edited file)."""
    f = c.path / "state.json"
    for key, typ in _STATE_FIELDS.items():
        if key not in c.state:
            raise SlmError(f"{f}: field {key!r} is missing")
        if not isinstance(c.state[key], typ) or isinstance(c.state[key], bool):
            raise SlmError(f"{f}: field {key!r} must be {typ.__name__}, got {c.state[key]!r}")
    if len(c.rng) < c.state["world_size"] or not all(isinstance(r, dict) for r in c.rng):
        raise SlmError(f"{c.path / 'rng.pt'}: expected one RNG state per rank ({c.state['world_size']})")


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    f = Path(path) / "model.safetensors"
    try:
        with safe_open(str(f), framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
            aliases = json.loads((st.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise SlmError(f"{f}: cannot read checkpoint weights ({e})") from None
    for name, target in aliases.items():
        if target not in tensors:
            raise SlmError(f"{f}: alias {name} points at missing tensor {target}")
        tensors[name] = tensors[target]
    return tensors


def _load_pickle(f: Path, typ: type):
    """One of slm's own torch.save files, with weights_only=True: plain containers and tensors only."""
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol: the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise SlmError(f"{f}: refused: it holds objects other than tensors and plain containers "
                       "(not a file slm wrote; never load it unrestricted)") from None
    except EOFError:
        raise SlmError(f"{f}: empty or truncated checkpoint file") from None
    except Exception as e:  # noqa: BLE001 - RuntimeError (bad zip), OSError...: all mean a broken file here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlmError(f"{f}: not a valid checkpoint file ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(obj, typ):
        raise SlmError(f"{f}: expected a {typ.__name__}, got {type(obj).__name__}")
    return obj


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    state = read_state(path)
    optimizer = _load_pickle(path / "optimizer.pt", dict)
    rng = _load_pickle(path / "rng.pt", list)
    return Checkpoint(path, state["step"], read_model_state(path), optimizer, rng, state)
