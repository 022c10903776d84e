"""Checkpoint files: atomic writes, the completion marker, keep-last-K, tied weights, RNG states."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from slm.atomic import TMP_TAG
from slm.errors import SlmError
from slm.train import checkpoint as ckpt


def _dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer leaves in its temp names)."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _save(run, step, keep_last=3, model=None):
    model = model or {"a": torch.arange(6.0).reshape(2, 3) + step, "b": torch.ones(3)}
    optim = {"state": {"a": {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(2, 3)}}, "param_groups": [
        {"lr": 1e-3, "betas": (0.9, 0.95), "params": ["a", "b"]}]}
    return ckpt.save_checkpoint(run, step, model, optim, [ckpt.capture_rng()], {"loader": {"position": step}},
                                keep_last)


def test_round_trip_and_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    c = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert c.step == 40 and c.state["loader"] == {"position": 40}
    assert torch.equal(c.model["a"], torch.arange(6.0).reshape(2, 3) + 40)
    assert c.optimizer["param_groups"][0]["betas"] == (0.9, 0.95) and c.optimizer["state"]["a"]["step"] == 40.0


def test_incomplete_checkpoints_are_never_used(tmp_path):
    _save(tmp_path, 10)
    good = _save(tmp_path, 20)
    # a writer killed before the rename leaves a temp dir; one killed before the marker, a dir without it
    shutil.copytree(good, tmp_path / "checkpoints" / f".step_00000030{TMP_TAG}{_dead_pid()}-0000")
    half = shutil.copytree(good, tmp_path / "checkpoints" / "step_00000040")
    (half / ckpt.MARKER).unlink()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.resolve_checkpoint(tmp_path) == good
    with pytest.raises(SlmError, match="incomplete"):
        ckpt.resolve_checkpoint(half)
    _save(tmp_path, 50)  # the next save sweeps the crashed writer's temp dir
    assert not list((tmp_path / "checkpoints").glob(f"*{TMP_TAG}*"))


def test_tied_tensors_are_stored_once_and_restored_as_one(tmp_path):
    emb = torch.randn(5, 4)
    path = _save(tmp_path, 1, model={"tok_embeddings.weight": emb, "output.weight": emb, "norm.weight": torch.ones(4)})
    state = ckpt.read_model_state(path)
    assert torch.equal(state["output.weight"], emb) and state["output.weight"] is state["tok_embeddings.weight"]


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(saved)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_not_a_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SlmError, match="not a run directory"):
        ckpt.resolve_checkpoint(tmp_path)
