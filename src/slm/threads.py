"""How many CPU threads a model should run with: the cores that are free right now.

Why not torch's default (every core): batch-1 decoding splits each matmul over the threads and
waits for the slowest. On a machine where another process holds a core, the thread that shares
that core runs a fraction of the time and every step waits for it: measured here, with one busy
background process on 2 cores, `--threads 2` fell to 0.8-5.7 tokens/s while `--threads 1` gave
8-15 (issue 16). So the default counts the cores that were idle over a short window (/proc/stat;
elsewhere the load average) and uses that many, at least one. `--threads N` overrides it.

slm's native decode kernels (`slm.native`) go one step further without `--threads`: they may use any
usable core and pick the count by measured step time while they run (`native_threads`), so a
machine that gets busy or quiet mid-run is followed. `--threads N` pins them to N.
"""

from __future__ import annotations

import math
import os
import time

import torch

from slm.errors import SlmError

WINDOW_S = 0.2  # long enough to average over a scheduler tick or two, short beside model loading


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies summed over all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
    return fields[3] + fields[4], sum(fields[:8])


def busy_cores(window_s: float = WINDOW_S) -> float:
    """How many cores other processes kept busy over the last `window_s` seconds (this process
    sleeps meanwhile); from the 1-minute load average where /proc/stat is missing."""
    n = os.cpu_count() or 1
    a = _cpu_times()
    if a is not None:
        time.sleep(window_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            return n * (1.0 - (b[0] - a[0]) / (b[1] - a[1]))
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int | None = None) -> int:
    """`requested` if given (>= 1), else the usable cores that are free: those not busy, rounded
    down unless a core is at least 70% free, and never fewer than one."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise SlmError(f"--threads must be >= 1, got {requested!r}")
        return requested
    usable = usable_cores()
    free = (os.cpu_count() or usable) - busy_cores()
    return max(1, min(usable, math.floor(free + 0.3)))


_native: tuple[int, bool] | None = None  # set_threads' choice for the native kernels: (threads, adaptive)


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to `choose_threads(requested)`; returns the number. Also what the
    native kernels may use: exactly `requested` if given, else up to every usable core, by measurement."""
    global _native
    n = choose_threads(requested)
    torch.set_num_threads(n)
    _native = (n, False) if requested is not None else (max(n, usable_cores()), True)
    return n


def native_threads() -> tuple[int, bool]:
    """(threads, adaptive) for the native kernels: set_threads' choice, or, where it was never called
    (slm as a library), up to torch's thread count, by measurement."""
    return _native if _native is not None else (torch.get_num_threads(), True)
