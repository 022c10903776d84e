"""Training metrics: FLOPs per token, MFU, a JSONL log and (when installed) TensorBoard.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, with the model's
training FLOPs per token from the PaLM paper (appendix B):

    flops_per_token = 6 N + 12 L H Q T

N = parameters that take part in matmuls (all parameters minus the input embedding table,
which is a lookup; with tied embeddings the shared matrix counts once, as the output
head), L layers, H heads, Q head dim, T sequence length. 6N is forward (2N) plus backward
(4N) of the matmuls; 12 L H Q T is attention's QK^T and AV (causal masking not discounted,
as in PaLM and nanoGPT). Recomputation (activation checkpointing) is not counted: MFU
measures useful work.

Peak: `--peak-tflops` if given; on CUDA the dense bf16 tensor-core peak of known parts;
on CPU the fp32 GEMM throughput measured at start-up (so CPU-MFU is "fraction of what a
large matmul reaches on this machine now").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from slm.atomic import remove_tmp, replace_file, tmp_name
from slm.config import ModelConfig
from slm.errors import SlmError

# Dense (no sparsity) bf16 peak FLOP/s per device.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12)
    "A100": 312e12,
    "MI250": 362e12,  # per MI250 (two GCDs)
    "MI300X": 1307e12,
    "L4": 121e12,
}


def matmul_params(config: ModelConfig) -> int:
    n = config.num_params()
    return n if config.tie_embeddings else n - config.vocab_size * config.dim


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L H Q T (see module docstring)."""
    return 6 * matmul_params(config) + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


def measure_gemm_peak(device: torch.device, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of an n x n x n matmul, best of a short burst."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(2):  # warm-up
        a @ b
    deadline = time.perf_counter() + seconds
    timed = 0
    while timed < 3 or time.perf_counter() < deadline:  # at least 3 timings, however slow the machine
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        timed += 1
    return best


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if peak_tflops:
        return peak_tflops * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} dense bf16 spec"
        return measure_gemm_peak(device, torch.bfloat16, n=4096), f"{name} measured bf16 GEMM"
    return measure_gemm_peak(device), "measured fp32 GEMM (1024^3)"


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl; mirrors scalars to TensorBoard if installed.

    The one file slm appends to rather than replaces (slm.atomic): a log grows line by line, and a
    kill can cost only the last, partial line, which `read_metrics` drops."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self._f = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # cut short by a kill mid-write
                break
            raise SlmError(f"{path}:{i + 1}: not a JSON line") from None
    return records


def trained_seconds(run_dir: str | Path) -> float:
    """Training time a run has spent so far, over all its (interrupted and resumed) sessions."""
    total, session = 0.0, 0.0
    for r in read_metrics(run_dir):
        if r.get("kind") == "start":
            total, session = total + session, 0.0
        elif "elapsed_s" in r:
            session = max(session, r["elapsed_s"])
        elif r.get("kind") == "end":
            session = max(session, r.get("seconds", 0.0))
    return total + session


def plot_losses(run_dir: str | Path, png: str | Path, title: str | None = None, baseline: float | None = None) -> Path:
    """Training and validation loss against tokens seen, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SlmError("plotting needs matplotlib (pip install 'slm[plot]')") from None
    records = read_metrics(run_dir)
    starts = [r for r in records if r["kind"] == "start"]
    tokens_per_step = starts[-1]["tokens_per_step"] if starts else 1
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] * tokens_per_step / 1e6 for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax.plot([r["step"] * tokens_per_step / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram cross-entropy ({baseline:.2f})")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or str(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = tmp_name(png)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        replace_file(tmp, png)
    finally:
        plt.close(fig)
        remove_tmp(tmp)  # only still there if saving failed
    return png
