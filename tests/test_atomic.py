"""slm.atomic: files and directories replaced whole, temporary names swept after a kill, and model
directories written only where slm may write them (issue 13 items 5 and 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from _bad_input_common import snapshot, write_tiny_gguf

from slm.atomic import TMP_TAG, atomic_dir, atomic_write, sweep_stale, tmp_name, write_text
from slm.cli import main
from slm.errors import SlmError
from slm.load import load_model
from slm.weights import is_model_dir


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    f = tmp_path / "a.json"
    write_text(f, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(f) as out:
            out.write("half")
            raise RuntimeError("boom")
    assert f.read_text() == "old\n" and os.listdir(tmp_path) == ["a.json"]


def test_next_write_sweeps_a_killed_writers_temp_file(tmp_path):
    stale = tmp_path / f".results.json{TMP_TAG}{_dead_pid()}-0000"
    stale.write_text("{half")
    write_text(tmp_path / "results.json", "{}\n")
    assert os.listdir(tmp_path) == ["results.json"]


def test_sweep_removes_only_dead_writers_temp_names(tmp_path):
    dead = tmp_path / f".model{TMP_TAG}{_dead_pid()}-abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    dead_file = tmp_path / f".m.json{TMP_TAG}{_dead_pid()}-ef01"
    dead_file.write_text("{")
    alive = tmp_path / f".other{TMP_TAG}{os.getppid()}-0000"  # a live process's: not ours to remove
    alive.mkdir()
    mine = tmp_path / f".x{TMP_TAG}{os.getpid()}-0000"  # this process's own, in use
    mine.mkdir()
    plain = tmp_path / ".model.tmp-123"  # not slm's naming: never touched
    plain.mkdir()
    assert set(sweep_stale(tmp_path)) == {dead, dead_file}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, mine, plain))


def test_atomic_dir_replaces_only_what_it_may(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, lambda p: (p / "mine").is_file(), "thing") as tmp:
        (tmp / "mine").write_text("1")
    with atomic_dir(target, lambda p: (p / "mine").is_file(), "thing") as tmp:  # ours: replaced
        (tmp / "mine").write_text("2")
    assert (target / "mine").read_text() == "2"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(SlmError, match="not a thing slm wrote"):
        with atomic_dir(foreign, lambda p: False, "thing"):
            pytest.fail("must not get here")
    assert os.listdir(foreign) == ["notes.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, lambda p: True, "thing") as tmp:
            (tmp / "mine").write_text("3")
            raise KeyboardInterrupt
    assert (target / "mine").read_text() == "2"
    assert not [p for p in tmp_path.iterdir() if TMP_TAG in p.name]


def test_export_and_import_replace_an_empty_or_slm_written_dir(tmp_path, tiny_model_dir, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    out.mkdir()  # empty: fine
    assert main(["import", str(gguf), "--out", str(out)]) == 0
    assert is_model_dir(out)
    assert main(["import", str(gguf), "--out", str(out)]) == 0  # slm wrote it: replaced
    load_model(out)
    assert not [p for p in tmp_path.iterdir() if TMP_TAG in p.name]
    (out / "notes.txt").write_text("mine")  # now it holds something slm did not write
    assert main(["import", str(gguf), "--out", str(out)]) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_interrupted_import_cleans_up(tmp_path, monkeypatch):
    import slm.weights

    gguf = write_tiny_gguf(tmp_path / "m.gguf")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(slm.weights, "save_file", interrupted)
    before = snapshot(tmp_path)
    assert main(["import", str(gguf), "--out", str(tmp_path / "out")]) == 130
    assert snapshot(tmp_path) == before


def test_killed_import_leaves_a_temp_dir_that_the_next_run_sweeps(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "models" / "out"
    # SIGKILL in the middle of writing model.safetensors: no handler, no finally block runs.
    script = textwrap.dedent(f"""
        import os, signal
        import safetensors.torch, slm.weights
        real = safetensors.torch.save_file
        def save_and_die(tensors, path, **kw):
            real(tensors, path, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        slm.weights.save_file = save_and_die
        from slm.cli import main
        main(["import", {str(gguf)!r}, "--out", {str(out)!r}])
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    leftovers = [q for q in out.parent.iterdir() if TMP_TAG in q.name]
    assert leftovers and (leftovers[0] / "model.safetensors").is_file() and not out.exists()
    assert main(["import", str(gguf), "--out", str(out)]) == 0  # the next run sweeps it
    assert sorted(q.name for q in out.parent.iterdir()) == ["out"]


def test_terminated_import_removes_its_temp_dir(tmp_path):
    """SIGTERM (a plain `kill`) unwinds like Ctrl-C: the temporary directory goes at once."""
    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "models" / "out"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import pathlib, time
        import safetensors.torch, slm.weights
        real = safetensors.torch.save_file
        def save_and_wait(tensors, path, **kw):
            real(tensors, path, **kw)
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(60)
        slm.weights.save_file = save_and_wait
        from slm.cli import main
        raise SystemExit(main(["import", {str(gguf)!r}, "--out", {str(out)!r}]))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert [q for q in out.parent.iterdir() if TMP_TAG in q.name]  # mid-write
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert p.stderr.read() == "slm: terminated\n"
    assert list(out.parent.iterdir()) == []


def test_tmp_names_are_recognisable_and_per_process(tmp_path):
    a, b = tmp_name(tmp_path / "x.json"), tmp_name(tmp_path / "x.json")
    assert a != b and a.parent == tmp_path and f"{TMP_TAG}{os.getpid()}-" in a.name and a.name.startswith(".x.json")
