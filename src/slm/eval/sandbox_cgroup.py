"""One cgroup per sandboxed sample: its memory, task count and CPU bounded as a whole.

The launcher joins these groups before it forks anything, so every process the sample ever
starts (setsid, fork chains, threads) is counted against the same limits:
  memory  memory.limit_in_bytes (and memsw, when swap is accounted): resident memory of all its
          processes together, tmpfs pages it writes included; over it, the kernel's OOM kill;
  pids    pids.max: tasks (processes and threads) alive at once;
  cpuacct the CPU time of all its processes together: the launcher's supervisor kills the
          sample when it passes its budget, and the harness reports it.
(Not the cpu controller: a CFS quota per sample made scoring ~30% slower on a loaded machine.)
Created under the cgroup we run in (so a container's own limits still apply above them) in the
cgroup v1 hierarchies, which is what this project's machines have. A host that offers only
cgroup v2 gets a one-line error, not a weaker sandbox.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from slm.errors import SlmError

CONTROLLERS = ("memory", "pids", "cpuacct")
GROUP = "slm-sandbox"


def _mounts() -> dict[str, Path]:
    """Mount point of each cgroup v1 controller (from /proc/self/mountinfo)."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _source, options = post.split()[:3]
            if fstype == "cgroup":
                for opt in options.split(","):
                    found.setdefault(opt, Path(pre.split()[4]))
    return found


def _own_paths() -> dict[str, str]:
    """Our cgroup (path inside its hierarchy) for each v1 controller (from /proc/self/cgroup)."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                paths[c] = path
    return paths


@functools.lru_cache(maxsize=1)
def _parents() -> dict[str, Path]:
    mounts, own = _mounts(), _own_paths()
    missing = [c for c in CONTROLLERS if c not in mounts or c not in own]
    if missing:
        raise SlmError(f"sandbox: needs the cgroup v1 controllers {', '.join(CONTROLLERS)} (missing: "
                       f"{', '.join(missing)}); a cgroup v2-only host is not supported yet")  # fmt: skip
    return {c: mounts[c] / own[c].lstrip("/") / GROUP for c in CONTROLLERS}


def _write(path: Path, value) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise SlmError(f"sandbox: cannot set {path} to {value} ({e.strerror})") from None


@dataclass
class SampleCgroup:
    dirs: dict[str, Path]  # controller -> this sample's directory

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    @property
    def cpu_usage_file(self) -> str:
        return str(self.dirs["cpuacct"] / "cpuacct.usage")

    def cpu_seconds(self) -> float | None:
        try:
            return int(Path(self.cpu_usage_file).read_text()) / 1e9
        except (OSError, ValueError):  # reporting only: the limit itself is the supervisor's
            return None

    def pids(self) -> set[int]:
        found = set()
        for d in self.dirs.values():
            try:
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except FileNotFoundError:
                pass
        return found

    def destroy(self, timeout: float = 5.0) -> None:
        """SIGKILL whatever is still in it (nothing, normally: its PID namespace died first), remove it."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                for d in self.dirs.values():
                    if d.exists():
                        d.rmdir()
                return
            except OSError as e:  # EBUSY: a killed task not gone yet
                if time.monotonic() > deadline:
                    raise SlmError(f"sandbox: cannot remove cgroup {e.filename} ({e.strerror})") from None
                time.sleep(0.002)


def create(name: str, memory_bytes: int, max_tasks: int) -> SampleCgroup:
    """A fresh cgroup `name` (a leased sandbox uid: ours alone) in each controller, limits set."""
    dirs = {c: parent / name for c, parent in _parents().items()}
    group = SampleCgroup(dirs)
    if any(d.exists() for d in dirs.values()):  # left by a harness that crashed while holding the lease
        group.destroy()
    try:
        for d in dirs.values():
            d.mkdir(parents=True)
    except OSError as e:
        raise SlmError(f"sandbox: cannot create cgroup {e.filename} ({e.strerror}); the sandbox needs root "
                       "and writable cgroup v1 hierarchies") from None  # fmt: skip
    _write(dirs["memory"] / "memory.limit_in_bytes", memory_bytes)
    if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
        _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory_bytes)
    _write(dirs["pids"] / "pids.max", max_tasks)
    return group
