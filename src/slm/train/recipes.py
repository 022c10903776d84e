"""Training configuration: one dataclass, AMD's recipes as named defaults, overrides, and the
resolved config that a run directory records.

`TrainConfig`'s defaults are AMD-Llama-135m's published pretraining hyperparameters (recipe
`amd-pretrain`); a recipe is a small dict of changes on top of them; command-line flags are
changes on top of the recipe. `resolve()` applies both and checks the result, so every run
directory holds the exact values it trained with (`train_config.json`).

Decisions worth knowing:
- Weight decay applies to matrices (linear weights and the embedding table) and not to
  RMSNorm gains, as Hugging Face's Trainer (which AMD used) and nanoGPT do: decaying a
  norm's gain toward 0 only fights the normalisation.
- The learning-rate schedule is defined over `max_steps` (linear warm-up, cosine to
  `min_lr`). `time_budget` only stops the run early (with a checkpoint): a time-boxed run
  that should finish its cosine sets `--max-steps` to what fits the budget.
- `global_batch` is counted in sequences. The micro-batch (`batch_size`) times the
  data-parallel world size times gradient accumulation must equal it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from slm.errors import SlmError
from slm.train.checkpoint import write_text_atomic


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train, on what, where
    model: str | None = _f(None, "model config name (slm.config), e.g. llama-16m; default: that of --init-from")
    data: str = _f("", "prepared data directory (slm data prepare)")
    out: str = _f("", "run directory: checkpoints, metrics, resolved config")
    recipe: str = _f("amd-pretrain", "named defaults: " + ", ".join(("amd-pretrain", "amd-code")))
    init_from: str | None = _f(None, "start from the weights of this model directory")
    vocab_size: int | None = _f(None, "override the model config's vocabulary size (to fit another tokenizer)")
    # optimisation (AMD-Llama-135m: AdamW 0.9/0.95, lr 6e-4 -> 6e-5 cosine, 2000 warm-up, wd 0.1, clip 1.0)
    max_steps: int = _f(320_000, "optimizer steps; also the length of the LR schedule (AMD: ~670B tokens)")
    lr: float = _f(6e-4, "peak learning rate")
    min_lr: float = _f(6e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(2000, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only, not norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    # batch geometry
    global_batch: int | None = _f(1024, "sequences per optimizer step, over all ranks and accumulation steps")
    batch_size: int = _f(8, "micro-batch: sequences per forward/backward on one rank")
    grad_accum: int | None = _f(None, "micro-batches per step per rank (instead of --global-batch)")
    seq_len: int | None = _f(None, "tokens per sequence; must match the data (default: the data's)")
    # bookkeeping
    seed: int = _f(3407, "seed for initialisation, data order and every RNG")
    checkpoint_every: int = _f(1000, "write a checkpoint every N steps (and always at the end)")
    keep_last: int = _f(3, "keep the newest K complete checkpoints")
    eval_every: int = _f(1000, "validation loss/perplexity every N steps (0: off)")
    eval_batches: int = _f(50, "validation micro-batches per evaluation, over all ranks (0: the whole split)")
    log_every: int = _f(10, "write a metrics line every N steps")
    time_budget: float | None = _f(None, "stop cleanly (final checkpoint) after this many seconds")
    # engine
    parallel: str = _f("ddp", "data parallelism under torchrun: ddp or fsdp (FSDP2 sharding)")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = _f("auto", "auto (fp32 on CPU, bf16 autocast on CUDA), fp32 or bf16")
    compile: bool = _f(False, "torch.compile each transformer block")
    activation_checkpointing: bool = _f(False, "recompute block activations in the backward pass")
    loss_chunk: int = _f(-1, "rows per chunk of the fused output+cross-entropy (-1: auto, 0: plain full logits)")
    peak_tflops: float | None = _f(None, "peak FLOP/s (in TFLOP/s) for MFU; default: known GPU table or a measured CPU GEMM")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A recipe: changes on top of TrainConfig's defaults (which are amd-pretrain).
RECIPES: dict[str, dict[str, Any]] = {
    "amd-pretrain": {},
    # AMD-Llama-135m-code: AMD-Llama-135m continued on ~20B tokens of code (StarCoder) at half the LR.
    "amd-code": {"lr": 3e-4, "min_lr": 3e-5, "max_steps": 9_537},
}

# Fields that may change when a run resumes: they do not change what is computed.
RESUMABLE_CHANGES = frozenset({
    "time_budget", "checkpoint_every", "keep_last", "eval_every", "eval_batches", "log_every",
    "compile", "activation_checkpointing", "device", "peak_tflops", "out",
    "parallel",  # checkpoints hold full tensors, whatever the sharding
})

FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


def resolve(recipe: str = "amd-pretrain", **overrides: Any) -> TrainConfig:
    """Recipe defaults + overrides -> a checked TrainConfig (geometry not yet tied to a world size)."""
    if recipe not in RECIPES:
        raise SlmError(f"unknown training recipe {recipe!r}; known: {', '.join(RECIPES)}")
    unknown = [k for k in overrides if k not in FIELD_NAMES]
    if unknown:
        raise SlmError(f"unknown training option(s): {', '.join(unknown)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}, "recipe": recipe}
    if overrides.get("grad_accum") is not None and overrides.get("global_batch") is None:
        values["global_batch"] = None  # accumulation given: the global batch follows from it
    cfg = TrainConfig(**values)
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise SlmError("training needs a data directory (--data)")
    if not cfg.out:
        raise SlmError("training needs a run directory (--out)")
    if cfg.recipe == "amd-code" and not cfg.init_from:
        raise SlmError("recipe amd-code continues a trained model: give --init-from MODEL_DIR")
    if cfg.model is None and not cfg.init_from:
        raise SlmError("give a model config (--config NAME) or a model to start from (--init-from DIR)")
    for name in ("max_steps", "batch_size", "checkpoint_every", "keep_last", "log_every"):
        if getattr(cfg, name) < 1:
            raise SlmError(f"training option {name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "eval_batches", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise SlmError(f"training option {name} must be >= 0, got {getattr(cfg, name)}")
    if not (0 < cfg.min_lr <= cfg.lr) and not (cfg.min_lr == 0 and cfg.lr > 0):
        raise SlmError(f"learning rates must satisfy 0 <= min_lr <= lr, 0 < lr; got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.global_batch is not None and cfg.grad_accum is not None:
        raise SlmError("give either --global-batch or --grad-accum, not both")
    if cfg.grad_accum is not None and cfg.grad_accum < 1:
        raise SlmError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    if cfg.global_batch is not None and cfg.global_batch < 1:
        raise SlmError(f"--global-batch must be >= 1, got {cfg.global_batch}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise SlmError(f"--parallel must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise SlmError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if cfg.time_budget is not None and cfg.time_budget <= 0:
        raise SlmError(f"--time-budget must be > 0 seconds, got {cfg.time_budget}")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank, so that the global batch is exact."""
    if cfg.grad_accum is not None:
        return cfg.grad_accum
    per_step = cfg.batch_size * world_size
    if cfg.global_batch % per_step:
        raise SlmError(
            f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} x "
            f"{world_size} rank(s) = {per_step}"
        )
    return cfg.global_batch // per_step


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# --- the resolved config on disk ---------------------------------------------------------


def save_config(cfg: TrainConfig, path) -> None:
    write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def load_config(path) -> TrainConfig:
    try:
        d = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        raise SlmError(f"{path}: cannot read the run's training config ({e})") from None
    unknown = [k for k in d if k not in FIELD_NAMES]
    if unknown:
        raise SlmError(f"{path}: unknown training option(s) {', '.join(unknown)}")
    return TrainConfig(**d)


def merge_for_resume(saved: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """The saved config with the explicitly given flags applied; refuse changes that alter the computation."""
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(saved, k) != v}
    bad = sorted(k for k in changed if k not in RESUMABLE_CHANGES)
    if bad:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {changed[k]!r}" for k in bad)
        raise SlmError(
            f"{source}: cannot resume with a changed configuration ({detail}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )
    cfg = dataclasses.replace(saved, **changed)
    check(cfg)
    return cfg
