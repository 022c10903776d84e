"""Compile slm's native decode kernels (kernels.cpp) once per machine and load them with ctypes.

The library is built with the machine's own compiler for the machine's own CPU (`-march=native`),
into slm's cache, named by a hash of the source, the flags and the CPU's model and flags, so a
changed source, compiler flag or CPU (a home directory shared across machines) gets its own build.
A build takes a few seconds: the source includes no Python or torch headers.

No compiler, a failed build, or SLM_NATIVE=0 in the environment: `library()` returns None and slm
runs on PyTorch's kernels (slower, same results up to rounding); the reason is printed once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch  # noqa: F401  (loaded before the kernels, whose libgomp then resolves to torch's: one thread pool)

from slm.atomic import remove_tmp, replace_file, tmp_name
from slm.paths import cache_dir

SOURCE = Path(__file__).with_name("kernels.cpp")
ABI = 5  # slm_native_abi() of a library this Python side can drive
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_loaded: dict[tuple, ctypes.CDLL | None] = {}
_told: set[str] = set()


def _note(reason: str) -> None:
    if reason not in _told:
        _told.add(reason)
        print(f"slm: native kernels unavailable ({reason}); running on PyTorch's kernels", file=sys.stderr)


def _cpu_id() -> str:
    """What decides which instructions -march=native may use."""
    info = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                info.append(line)
                if len(info) >= 3:
                    break
    except OSError:
        pass
    return platform.machine() + "\n" + "\n".join(info)


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def library_path(flags: tuple[str, ...] = FLAGS) -> Path:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_id().encode(), str(compiler()).encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / "native" / f"slm_native-{h.hexdigest()[:16]}.so"


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile kernels.cpp with `flags` into the cache (if not there yet) -> the library's path.
    Raises RuntimeError with the compiler's message on failure."""
    out = library_path(flags)
    if out.is_file():
        return out
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out)
    try:
        proc = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-800:]}")
        replace_file(tmp, out)  # concurrent builders each rename a complete file
    finally:
        remove_tmp(tmp)
    return out


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.slm_native_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.slm_native_abi()}, expected {ABI}")
    lib.slm_forward.restype = ctypes.c_int
    lib.slm_forward.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # arrays: ctypes arrays or addresses
    ]
    lib.slm_linear.restype = ctypes.c_int
    lib.slm_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def library(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """The loaded kernels, building them first if needed; None (with a one-time note) if they
    cannot be had here or SLM_NATIVE=0."""
    if os.environ.get("SLM_NATIVE", "1") == "0":
        return None
    if flags not in _loaded:
        try:
            _loaded[flags] = load(build(flags))
        except (RuntimeError, OSError) as e:
            _note(str(e).splitlines()[0][:300])
            _loaded[flags] = None
    return _loaded[flags]
