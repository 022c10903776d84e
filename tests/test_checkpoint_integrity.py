"""Checkpoints that changed on disk (issue 13 item 9): a flipped bit is caught by the checksums and
the newest checkpoint that verifies is used, saying so; a hand-edited train_config.json is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _bad_input_common import copy_run, newest_checkpoint, prepare_tiny_data, resume_args, train_tiny_run

from slm.cli import main
from slm.errors import SlmError
from slm.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("integrity")
    return train_tiny_run(prepare_tiny_data(root, tokenizer_dir), root / "run", max_steps=4)


def _flip_a_bit(f):
    raw = bytearray(f.read_bytes())
    raw[len(raw) - 5] ^= 0x01  # inside the tensor data: the file still parses
    f.write_bytes(bytes(raw))


def test_every_checkpoint_verifies_as_written(run):
    assert [c.name for c in ckpt.complete_checkpoints(run)] == ["step_00000002", "step_00000004"]
    for c in ckpt.complete_checkpoints(run):
        assert ckpt.verify_checkpoint(c) is None


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_flipped_bit_is_detected(run, tmp_path, name):
    r = copy_run(run, tmp_path / "run")
    c = newest_checkpoint(r)
    _flip_a_bit(c / name)
    assert name in ckpt.verify_checkpoint(c)
    with pytest.raises(SlmError, match=f"{name} does not match its checksum"):
        ckpt.resolve_checkpoint(c)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(run, tmp_path, capfd):
    """Falling back to step 2 (and saying so) and training on gives the original run's step-4 weights."""
    r = copy_run(run, tmp_path / "run")
    c4 = newest_checkpoint(r)
    want = {k: v.clone() for k, v in ckpt.read_model_state(c4).items()}  # a copy: the file is memory-mapped
    _flip_a_bit(c4 / "model.safetensors")
    capfd.readouterr()
    assert main(resume_args(r)) == 0  # max_steps 4 from the saved config: redoes steps 3 and 4
    err = capfd.readouterr().err
    assert f"skipping checkpoint {c4}: model.safetensors does not match its checksum" in err
    assert ckpt.verify_checkpoint(c4) is None  # rewritten, whole
    got = ckpt.read_model_state(c4)
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] == got[k]).all(), (k, (want[k] - got[k]).abs().max())


def test_export_uses_the_newest_checkpoint_that_verifies(run, tmp_path, capfd):
    r = copy_run(run, tmp_path / "run")
    _flip_a_bit(newest_checkpoint(r) / "model.safetensors")
    assert main(["export", str(r), "--out", str(tmp_path / "model")]) == 0
    assert "skipping checkpoint" in capfd.readouterr().err


def test_all_corrupted_is_an_error(run, tmp_path):
    r = copy_run(run, tmp_path / "run")
    for c in ckpt.complete_checkpoints(r):
        _flip_a_bit(c / "optimizer.pt")
    with pytest.raises(SlmError, match="no checkpoint matches its checksums"):
        ckpt.resolve_checkpoint(r)
    assert main(resume_args(r)) == 2


def test_edited_lr_is_refused_and_restoring_it_resumes(run, tmp_path, capfd):
    r = copy_run(run, tmp_path / "run")
    cfg_file = r / "train_config.json"
    original = cfg_file.read_text()
    cfg = json.loads(original)
    cfg["lr"] = cfg["lr"] * 10
    cfg_file.write_text(json.dumps(cfg))
    assert main(resume_args(r)) == 2
    assert "train_config.json: lr is" in capfd.readouterr().err
    cfg_file.write_text(original)
    assert main(resume_args(r)) == 0


def test_malicious_pickle_is_one_line_from_the_real_command(run, tmp_path):
    """In a real process (warnings go to stderr there): still exactly one line, and nothing executed."""
    import pickle

    from _bad_input_common import rewrite_checksums

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    r = copy_run(run, tmp_path / "run")
    c = newest_checkpoint(r)
    (c / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    rewrite_checksums(c)
    p = subprocess.run([sys.executable, "-m", "slm", *resume_args(r)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "optimizer.pt: refused" in p.stderr, p.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_from_before_checksums_resumes_with_a_note(tmp_path, capsys):
    """Runs written by an older slm have no checksums.json: complete (their marker is there) but
    unverifiable. They are used, with a note on stderr, instead of stranding the run."""
    from slm.train.checkpoint import CHECKSUMS, verify_checkpoint

    c = tmp_path / "step_00000002"
    c.mkdir()
    (c / ckpt.MARKER).write_text("")
    assert verify_checkpoint(c) is None
    assert "predates checksums" in capsys.readouterr().err
    (c / CHECKSUMS).write_text("{}")  # a checksums file that is there but wrong is still refused
    assert verify_checkpoint(c) is not None
