"""The default thread count: the cores other processes leave free, at least one; --threads overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import torch

from slm.errors import SlmError
from slm.threads import busy_cores, choose_threads, usable_cores


def test_explicit_threads_win_and_bad_values_are_refused():
    assert choose_threads(3) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SlmError, match="--threads"):
            choose_threads(bad)


def test_default_counts_free_cores(monkeypatch):
    import slm.threads as threads

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    for busy, want in ((0.0, 4), (0.9, 3), (1.0, 3), (1.6, 2), (3.5, 1), (7.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda b=busy: b)
        assert choose_threads() == want, busy
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)  # an affinity mask caps it
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    assert choose_threads() == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_a_busy_process_is_seen():
    """A spinning child holds (about) one core: measured busy cores rise by most of one."""
    before = min(busy_cores(0.3) for _ in range(2))
    spin = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(0.3)
        during = max(busy_cores(0.3) for _ in range(2))
    finally:
        spin.kill()
        spin.wait()
    assert during >= before + 0.5 or during >= usable_cores() - 0.2, (before, during)


def test_the_native_kernels_are_pinned_by_threads_and_adaptive_without(monkeypatch):
    from slm import threads

    monkeypatch.setattr(threads, "_native", None)
    assert threads.native_threads() == (torch.get_num_threads(), True)  # slm as a library
    n = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and threads.native_threads() == (1, False)  # --threads 1: exactly 1
        chosen = threads.set_threads(None)
        assert threads.native_threads() == (max(chosen, threads.usable_cores()), True)
    finally:
        torch.set_num_threads(n)
