"""End-to-end `slm train` runs in subprocesses: exact resume after SIGKILL, a crash while a
checkpoint is written, export to transformers, the time budget, and data parallelism under
torchrun (DDP and FSDP2 on gloo, one node and two) against a single process."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _bad_input_common import prepare_tiny_data

from slm.atomic import TMP_TAG

# One intra-op thread per process: the tiny model gains nothing from more, and on a shared
# 2-core machine extra OpenMP threads only spin against other processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MAX_STEPS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return prepare_tiny_data(tmp_path_factory.mktemp("train_data"), tokenizer_dir, n_docs=60)


def train_args(data_dir: Path, out: Path, **over) -> list[str]:
    opts = {"config": "tiny", "vocab-size": 320, "data": data_dir, "out": out, "max-steps": MAX_STEPS,
            "batch-size": 4, "global-batch": 8, "warmup-steps": 5, "lr": 3e-3, "min-lr": 3e-4,
            "checkpoint-every": 10, "keep-last": 2, "eval-every": 20, "eval-batches": 4, "log-every": 1, **over}
    args = []
    for k, v in opts.items():
        if v is not None:  # None: leave the option out
            args += [f"--{k}", str(v)]
    return args + ["--json"]


def slm_train(*args: str, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "slm", "train", *args], env=env or ENV, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"slm train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def slm_in_process(*args: str) -> int:
    """`slm ...` in this process (no interpreter start-up), on one thread like the subprocesses."""
    from slm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


def final_weights(run: Path, step: int = MAX_STEPS) -> dict[str, torch.Tensor]:
    from slm.train.checkpoint import read_model_state

    return read_model_state(run / "checkpoints" / f"step_{step:08d}")


def losses(run: Path) -> dict[int, float]:
    from slm.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max().item()}"


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> Path:
    """One uninterrupted single-process run of MAX_STEPS."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert slm_in_process("train", *train_args(data_dir, out)) == 0
    return out


def test_uninterrupted_run_learns_and_records(reference_run):
    from slm.train.checkpoint import complete_checkpoints
    from slm.train.metrics import read_metrics

    records = read_metrics(reference_run)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # ln(320) = 5.77 at the start
    assert [r["step"] for r in val] == [20, 40] and val[-1]["val_loss"] < val[0]["val_loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(r[key] > 0 for r in train)
    # the LR logged with step s is the one step s used: warm-up from lr/5, cosine toward min_lr at step 40
    last = 3e-4 + 0.5 * (1 + math.cos(math.pi * 34 / 35)) * (3e-3 - 3e-4)
    assert train[0]["lr"] == pytest.approx(3e-3 / 5) and train[-1]["lr"] == pytest.approx(last)
    # keep-last 2 of the checkpoints at 10, 20, 30, 40
    assert [p.name for p in complete_checkpoints(reference_run)] == ["step_00000030", "step_00000040"]
    saved = json.loads((reference_run / "train_config.json").read_text())
    assert saved["lr"] == 3e-3 and saved["beta2"] == 0.95 and saved["seed"] == 3407


def test_sigkill_then_resume_is_bit_identical(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "slm", "train", *train_args(data_dir, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step_00000010" / "COMPLETE"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "checkpoints" / f"step_{MAX_STEPS:08d}").exists()

    assert slm_in_process("train", *train_args(data_dir, out), "--resume") == 0
    assert_bit_identical(final_weights(out), final_weights(reference_run))
    assert losses(out) == losses(reference_run)  # the metrics past the checkpoint were recomputed, not doubled


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(data_dir, reference_run, tmp_path):
    from slm.train.checkpoint import CRASH_ENV, latest_checkpoint

    out = tmp_path / "run"
    p = slm_train(*train_args(data_dir, out), env={**ENV, CRASH_ENV: "20"}, check=False)
    assert p.returncode == 17
    leftovers = list((out / "checkpoints").glob(f".step_00000020{TMP_TAG}*"))
    assert leftovers and (leftovers[0] / "model.safetensors").exists()  # died mid-write
    assert latest_checkpoint(out).name == "step_00000010"

    assert slm_in_process("train", *train_args(data_dir, out), "--resume") == 0
    assert_bit_identical(final_weights(out), final_weights(reference_run))
    assert not list((out / "checkpoints").glob(f"*{TMP_TAG}*"))


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_a_used_dir(data_dir, reference_run, capsys):
    assert slm_in_process("train", *train_args(data_dir, reference_run, lr=1e-3), "--resume") == 2
    assert "cannot resume with a changed configuration (lr: 0.003 -> 0.001)" in capsys.readouterr().err
    assert slm_in_process("train", *train_args(data_dir, reference_run)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_time_budget_stops_with_a_checkpoint(data_dir, tmp_path, capsys):
    from slm.train.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    capsys.readouterr()
    assert slm_in_process("train", *train_args(data_dir, out, **{"max-steps": 100000, "time-budget": 1})) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stopped_by"] == "time_budget" and 0 < summary["step"] < 100000
    assert latest_checkpoint(out).name == f"step_{summary['step']:08d}"


def test_export_loads_in_transformers_with_the_same_logits(reference_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from slm.load import load_model

    out = tmp_path / "model"
    assert slm_in_process("export", str(reference_run), "--out", str(out)) == 0
    assert (out / "tokenizer.json").is_file()
    ours = load_model(out)
    assert_bit_identical(dict(ours.state_dict()), final_weights(reference_run))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("def add").input_ids


def test_export_gguf_of_a_run_holds_its_final_weights(reference_run, tmp_path):
    from slm.gguf_import import read_gguf
    from slm.weights import build_model, hf_to_slm

    out = tmp_path / "run.gguf"
    assert slm_in_process("export", str(reference_run), "--format", "gguf", "--out", str(out)) == 0
    config, hf, files = read_gguf(out)
    assert "tokenizer.json" in files
    assert_bit_identical(dict(build_model(config, hf_to_slm(hf, config)).state_dict()), final_weights(reference_run))


def test_code_recipe_continues_an_exported_model(data_dir, reference_run, tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "code"
    assert slm_in_process("export", str(reference_run), "--out", str(model_dir)) == 0
    args = train_args(data_dir, out, config=None, **{"vocab-size": None, "max-steps": 3, "recipe": "amd-code",
                                                     "init-from": model_dir, "lr": None, "min-lr": None})
    assert slm_in_process("train", *args) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["recipe"], saved["lr"], saved["min_lr"]) == ("amd-code", 3e-4, 3e-5)
    # it starts where the exported model is, not from a random init (ln 320 = 5.77)
    assert losses(out)[1] < losses(reference_run)[1] - 1.0


def test_activation_checkpointing_recomputes_the_same_numbers(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    assert slm_in_process("train", *train_args(data_dir, out, **{"max-steps": 3}), "--activation-checkpointing") == 0
    ref = losses(reference_run)
    assert losses(out) == {s: ref[s] for s in (1, 2, 3)}


def test_loss_curve_png(reference_run, tmp_path):
    pytest.importorskip("matplotlib")
    from slm.train.metrics import plot_losses

    png = plot_losses(reference_run, tmp_path / "loss.png", baseline=5.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- data parallel ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


DIST_STEPS = 6


def dist_args(data_dir, out, **over):
    return train_args(data_dir, out, **{"max-steps": DIST_STEPS, "checkpoint-every": 3, "eval-every": 3,
                                        "log-every": 1, **over})


@pytest.fixture(scope="module")
def single_process_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert slm_in_process("train", *dist_args(data_dir, out)) == 0  # micro-batch 4, global 8: 2 accumulation steps
    return out


def torchrun(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{err[-4000:]}"
    return out


def _val_losses(run: Path) -> list[float]:
    from slm.train.metrics import read_metrics

    return [r["val_loss"] for r in read_metrics(run) if r["kind"] == "val"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(mode, data_dir, single_process_run, tmp_path):
    out = tmp_path / "run"
    _check(torchrun("--standalone", "--nproc-per-node", "2", "-m", "slm", "train",
                    *dist_args(data_dir, out, parallel=mode)))
    one, two = losses(single_process_run), losses(out)
    assert sorted(two) == list(range(1, DIST_STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), f"step {step}"
    assert _val_losses(out) == pytest.approx(_val_losses(single_process_run), abs=1e-5)
    # The checkpoint holds full tensors: the same weights as the single process, up to float reduction order.
    a, b = final_weights(out, DIST_STEPS), final_weights(single_process_run, DIST_STEPS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_resume_a_one_process_run_and_checkpoint(data_dir, single_process_run, tmp_path):
    """Two torchrun "nodes" (c10d rendezvous on localhost) continue a 1-process run from its step-3
    checkpoint: full-tensor checkpoints and the loader's global position make the world size free."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(single_process_run, out)
    shutil.rmtree(out / "checkpoints" / f"step_{DIST_STEPS:08d}")  # back to step 3
    port = _free_port()
    nodes = [
        torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "slm-test", "-m", "slm", "train",
                 *dist_args(data_dir, out, parallel="fsdp"), "--resume")
        for r in range(2)
    ]
    outputs = [_check(p) for p in nodes]
    summary = json.loads([o for o in outputs if o.strip()][0])
    assert summary["step"] == DIST_STEPS and summary["checkpoint"].endswith(f"step_{DIST_STEPS:08d}")
    from slm.train.metrics import read_metrics

    start = [r for r in read_metrics(out) if r["kind"] == "start"][-1]
    assert (start["step"], start["world_size"], start["grad_accum"]) == (3, 2, 1)
    one, two = losses(single_process_run), losses(out)
    assert sorted(two) == list(range(1, DIST_STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), f"step {step}"
    assert _val_losses(out) == pytest.approx(_val_losses(single_process_run), abs=1e-5)


@pytest.mark.slow
def test_two_processes_stop_together_at_the_time_budget(data_dir, tmp_path):
    """The budget is decided by rank 0 at log steps and shared there: both ranks stop after the same
    step (no collective in between to disagree on), with a checkpoint."""
    from slm.train.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    stdout = _check(torchrun("--standalone", "--nproc-per-node", "2", "-m", "slm", "train",
                             *train_args(data_dir, out, **{"max-steps": 100000, "time-budget": 3, "log-every": 4,
                                                           "eval-every": 0})))
    summary = json.loads([line for line in stdout.splitlines() if line.strip()][0])
    assert summary["stopped_by"] == "time_budget" and 0 < summary["step"] < 100000
    assert latest_checkpoint(out).name == f"step_{summary['step']:08d}"
