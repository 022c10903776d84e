"""Writing files so that a reader sees the old content or the new, never half of either.

Every writer in slm goes through here. The recipe: write a temporary file in the same directory
(so `os.replace` is a rename within one filesystem), fsync it, `os.replace` it over the target, then
fsync the directory so the rename itself survives a power cut. Temporary names carry `TMP_TAG` and
the writer's pid, so a later run can recognise (and sweep) what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from slm.errors import SlmError

TMP_TAG = ".slm-tmp-"  # in every temporary name slm creates: `.<name>.slm-tmp-<pid>-<random>`


def tmp_name(path: Path) -> Path:
    """A fresh temporary path beside `path`, recognisable as slm's and as this process's."""
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on a clean exit it replaces `path`.

    On an exception the temporary file is removed and `path` is left as it was; one a killed writer
    left is removed by the next write into the same directory."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    sweep_stale(path.parent)  # what a killed writer left beside it
    tmp = tmp_name(path)
    f = open(tmp, mode, encoding=None if "b" in mode else encoding)  # noqa: SIM115 (closed below)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Finish a file that a library wrote to `tmp` (made with `tmp_name`): fsync, rename, fsync dir."""
    tmp, path = Path(tmp), Path(path)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tmp(path: str | os.PathLike) -> None:
    """Remove a temporary file or directory (used on failure paths; never raises)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# --- whole directories (model directories, checkpoints) -----------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories slm left in `directory` from processes that are
    no longer alive (a killed writer); returns what was removed. Names without TMP_TAG are never touched."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for p in entries:
        _, tag, rest = p.name.partition(TMP_TAG)
        pid = rest.split("-", 1)[0]
        if tag and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            remove_tmp(p)
            removed.append(p)
    return removed


def check_replaceable_dir(path: str | os.PathLike, replaceable: Callable[[Path], bool], what: str) -> Path:
    """Refuse to write a directory over something that is not ours to replace: an existing file, the
    working directory (or one above it), or a non-empty directory for which `replaceable` is False."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SlmError(f"{path}: exists and is not a directory; give a new or empty directory for the {what}")
    if path.exists():
        here, target = Path.cwd().resolve(), path.resolve()
        if target == here or target in here.parents:
            raise SlmError(f"{path}: is the working directory (or contains it); give a new directory for the {what}")
        if any(path.iterdir()) and not replaceable(path):
            raise SlmError(
                f"{path}: exists and is not a {what} slm wrote; refusing to replace it (give a new or empty directory)"
            )
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replaceable: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on a clean exit it replaces `path`.

    `path` must be absent, empty, or a directory `replaceable` recognises as one slm wrote (checked
    first, so a refused call creates nothing). Every file inside is fsynced before the rename; on an
    exception (or a kill, through `sweep_stale` on the next run) the temporary directory goes away."""
    path = check_replaceable_dir(path, replaceable, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    tmp = tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        old = None
        if path.exists():  # rename the old one away first: a directory cannot be replaced in one step
            old = tmp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        remove_tmp(tmp)
        raise
    fsync_dir(path.parent)
    if old is not None:
        remove_tmp(old)
