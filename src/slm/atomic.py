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
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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

    On an exception the temporary file is removed and `path` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
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
