"""The training loop: `train(cfg)` runs one process's share of a (possibly distributed) run.

One optimizer step = `grad_accum` micro-batches per rank, each loss divided by `grad_accum`
so that, with the ranks' gradients averaged by DDP/FSDP, the step's gradient is the mean
over the global batch. Then: clip, AdamW, LR of the next step, and on schedule a metrics
line, a validation pass and a checkpoint. The same function runs alone or under torchrun.

Exact resume: everything a step depends on is in the checkpoint (weights, AdamW moments and
step counts, loader position, RNG states) and the learning rate is a pure function of the
step, so a resumed run computes bit-identical weights on the same hardware and world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from slm.atomic import write_text
from slm.config import ModelConfig, get_config
from slm.data.loader import DataLoader, PackedDataset, iterate_eval, read_manifest
from slm.paths import file_sha256
from slm.errors import SlmError
from slm.load import load_model
from slm.train import checkpoint as ckpt
from slm.train.loss import LanguageModel
from slm.train.metrics import MetricsLog, flops_per_token, peak_flops, read_metrics
from slm.train.parallel import (
    DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum, barrier, init_distributed, no_grad_sync,
    parallelize, pick_device, shutdown_distributed,
)
from slm.train.recipes import RESUMABLE_CHANGES, TrainConfig, grad_accum_steps, lr_at, save_config
from slm.weights import copy_tokenizer_files, read_config

CONFIG_FILE = "train_config.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by: str  # "max_steps" or "time_budget"
    checkpoint: Path | None
    train_loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float


# --- setup pieces ------------------------------------------------------------------------------


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    if cfg.init_from:
        mc = read_config(cfg.init_from)
        if cfg.model is not None:
            named = get_config(cfg.model)
            if dataclasses.replace(named, name=mc.name, extra_hf=mc.extra_hf) != mc:
                raise SlmError(f"--config {cfg.model} does not match the shape of --init-from {cfg.init_from}")
        if cfg.vocab_size is not None and cfg.vocab_size != mc.vocab_size:
            raise SlmError(f"--vocab-size {cfg.vocab_size} differs from --init-from {cfg.init_from} ({mc.vocab_size})")
        return mc
    mc = get_config(cfg.model)
    return mc.replace(vocab_size=cfg.vocab_size) if cfg.vocab_size is not None else mc


def build_training_model(mc: ModelConfig, cfg: TrainConfig) -> LanguageModel:
    """A LanguageModel on CPU: AMD init from the seed, or the weights of --init-from."""
    model = LanguageModel(mc)
    if cfg.init_from:
        model.load_state_dict(load_model(cfg.init_from).state_dict(), strict=True)
    else:
        model.init_weights(torch.Generator().manual_seed(cfg.seed))
    model.loss_chunk = cfg.loss_chunk
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices (linear weights, embeddings), not norm gains; see recipes.py.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=lr_at(cfg, 0), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda"
    )


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(cfg: TrainConfig, device: torch.device):
    """A factory of the forward's autocast context (a no-op context in fp32)."""
    dtype = autocast_dtype(cfg, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def data_checks(cfg: TrainConfig, mc: ModelConfig) -> dict:
    manifest = read_manifest(cfg.data)
    if cfg.seq_len is not None and cfg.seq_len != manifest["seq_len"]:
        raise SlmError(
            f"--seq-len {cfg.seq_len} differs from the data's seq_len {manifest['seq_len']} ({cfg.data}); "
            "prepare the data with the sequence length to train at"
        )
    if manifest["seq_len"] > mc.max_seq_len:
        raise SlmError(f"{cfg.data}: seq_len {manifest['seq_len']} exceeds model max_seq_len {mc.max_seq_len}")
    tok = manifest.get("tokenizer", {})
    if cfg.init_from and tok.get("path"):  # continuing a model on data it cannot read would be silent garbage
        mine = Path(cfg.init_from) / Path(tok["path"]).name
        if mine.is_file() and file_sha256(mine) != tok.get("sha256"):
            raise SlmError(f"{cfg.data} was tokenized with another tokenizer than {mine}")
    vocab = tok.get("vocab_size")
    if vocab is not None and vocab > mc.vocab_size:
        raise SlmError(f"{cfg.data}: tokenizer vocab_size {vocab} exceeds the model's vocab_size {mc.vocab_size}")
    return manifest


def copy_run_tokenizer(manifest: dict, run_dir: Path) -> None:
    """Keep the data's tokenizer in the run directory, so export never depends on where the data was."""
    src = manifest.get("tokenizer", {}).get("path")
    if not src or not Path(src).exists():
        return
    dst = run_dir / TOKENIZER_DIR
    dst.mkdir(exist_ok=True)
    copy_tokenizer_files(Path(src).parent, dst)


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, manifest: dict, resumed_at: int | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    copy_run_tokenizer(manifest, run_dir)
    if resumed_at is not None:  # drop metrics lines past the checkpoint: they are about to be recomputed
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resumed_at]
        write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- checkpoint glue ---------------------------------------------------------------------------


def _state_dict_options(cpu_offload: bool):
    # Full (unsharded) tensors: a checkpoint does not depend on the parallel mode or world size.
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def save_training_checkpoint(run_dir, model, optimizer, loader, step, info: DistInfo, cfg, extra: dict) -> Path | None:
    opts = _state_dict_options(cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)  # full on rank 0, empty elsewhere
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rng = all_gather_objects(ckpt.capture_rng(), info)
    path = None
    if info.is_main:
        state = {"loader": loader.state_dict(), "world_size": info.world_size, **extra}
        path = ckpt.save_checkpoint(run_dir, step, model_sd, optim_sd, rng, state, cfg.keep_last)
    barrier(info)
    return path


def check_model_state(c: ckpt.Checkpoint, model: torch.nn.Module) -> None:
    """Every tensor the model has, with its shape, and nothing else: name the first that differs."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in want.items():
        if name not in c.model:
            raise SlmError(f"{c.path}/model.safetensors: tensor {name} is missing")
        if tuple(c.model[name].shape) != shape:
            raise SlmError(f"{c.path}/model.safetensors: tensor {name} has shape {list(c.model[name].shape)}, "
                           f"the model needs {list(shape)}")
    extra = sorted(set(c.model) - set(want))
    if extra:
        raise SlmError(f"{c.path}/model.safetensors: unexpected tensor(s) {', '.join(extra[:5])}")


def check_config_unchanged(c: ckpt.Checkpoint, cfg: TrainConfig, config_file: Path) -> None:
    """The run's train_config.json must still say what the checkpoint was trained with (fields that
    change the computation): an edited `lr` would otherwise silently change a resumed run."""
    saved = c.state.get("config")
    if not isinstance(saved, dict):
        raise SlmError(f"{c.path}/state.json: field 'config' is missing")
    now = cfg.to_dict()
    for key in sorted(now):
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != now[key]:
            raise SlmError(
                f"{config_file}: {key} is {now[key]!r} but {c.path.name} was trained with {saved[key]!r} "
                f"(edited after the run started?); restore it, or start a new run with --init-from"
            )


def load_training_checkpoint(c: ckpt.Checkpoint, model, optimizer, loader, info: DistInfo, global_batch: int) -> None:
    ckpt.check_resume_state(c)
    if c.state["global_batch"] != global_batch:
        raise SlmError(
            f"{c.path}: checkpoint was trained with a global batch of {c.state['global_batch']} sequences, "
            f"this run has {global_batch}; resume with the same global batch"
        )
    check_model_state(c, model)
    opts = _state_dict_options(cpu_offload=False)
    try:
        set_model_state_dict(model, c.model, options=opts)
        set_optimizer_state_dict(model, optimizer, c.optimizer, options=opts)
        loader.load_state_dict(c.state["loader"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:  # a hand-edited optimizer/loader state
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlmError(f"{c.path}: checkpoint state does not fit this run ({type(e).__name__}: {first[:200]})") from None
    # Same world size: every rank gets its own RNG state back. Another world size: the model and
    # optimizer are full tensors and the loader position is global, so the run continues correctly;
    # the per-rank RNG streams (unused by this loop's math) are seeded afresh.
    if c.state["world_size"] == info.world_size:
        ckpt.restore_rng(c.rng[info.rank])


# --- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(engine, cfg: TrainConfig, info: DistInfo, amp) -> tuple[float, float] | None:
    """Mean validation loss over the first `eval_batches` micro-batches of the split (all if 0), and its perplexity.

    The same batches whatever the world size: global batch j is on rank j % world_size.
    """
    n_windows = len(PackedDataset(cfg.data, "val"))
    if n_windows == 0:
        return None
    limit = math.ceil(n_windows / cfg.batch_size)
    if cfg.eval_batches:
        limit = min(limit, cfg.eval_batches)
    mine = len(range(info.rank, limit, info.world_size))
    # Every rank runs the same number of forwards (FSDP gathers parameters collectively); a rank
    # with fewer batches runs zero-weight ones.
    rounds = math.ceil(limit / info.world_size)
    loss_sum, count = 0.0, 0
    x = None
    for x, y in islice(iterate_eval(cfg.data, "val", cfg.batch_size, info.rank, info.world_size), mine):
        with amp():
            loss = engine(x.to(info.device), y.to(info.device))
        loss_sum += float(loss) * y.numel()
        count += y.numel()
    dummy = torch.zeros(1, 1 if x is None else x.shape[1], dtype=torch.long, device=info.device)
    for _ in range(rounds - mine):
        with amp():
            engine(dummy, dummy)
    loss_sum, count = all_reduce_sum([loss_sum, float(count)], info)
    mean = loss_sum / max(count, 1.0)
    return mean, math.exp(min(mean, 80.0))


# --- the loop ----------------------------------------------------------------------------------


def train_step(engine, model, optimizer, loader, lr: float, accum: int, cfg: TrainConfig, info: DistInfo, amp):
    """One optimizer step over `accum` micro-batches -> (this rank's mean loss, global grad norm) as
    0-d device tensors: reading them waits for the device, so the loop reads them at log steps only."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    for micro in range(accum):
        x, y = next(loader)
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        # Gradients are reduced over ranks once per step, on the last micro-batch.
        with no_grad_sync(engine, cfg.parallel if info.distributed else "", sync=micro == accum - 1):
            with amp():
                loss = engine(x, y) / accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def steps_in_budget(cfg: TrainConfig, seconds: float, timed_steps: int = 4) -> int:
    """How many optimizer steps of `cfg` fit in `seconds` on this machine (one process), from a few
    timed steps of the model, optimizer and batches `train` builds for it: so that a run's LR
    schedule (warm-up, cosine) can be set to end when its time budget does."""
    info = DistInfo(device=pick_device(cfg.device))
    model = build_training_model(model_config_for(cfg), cfg).to(info.device)
    optimizer = build_optimizer(model, cfg, info.device)
    loader = DataLoader(cfg.data, "train", batch_size=cfg.batch_size, seed=cfg.seed)
    amp, accum, times = autocast(cfg, info.device), grad_accum_steps(cfg, 1), []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        loss, _ = train_step(model, model, optimizer, loader, lr_at(cfg, 0), accum, cfg, info, amp)
        float(loss)  # wait for the device
        times.append(time.perf_counter() - t0)
    # The fastest step after the first: the loop's steady state is faster than these first steps (a
    # median made the demo's first run stop at 70% of its budget). If this overestimates the steps,
    # the time budget still stops training, a little before the cosine schedule ends.
    return max(1, int(seconds / min(times[1:])))


def train(cfg: TrainConfig, resume: bool = False, show_progress: bool = False, log=print) -> TrainResult:
    """Train (or continue) the run in cfg.out. Under torchrun, every process calls this."""
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, resume, show_progress, log if info.is_main else (lambda *a, **k: None))
    finally:
        shutdown_distributed()


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, show_progress: bool, log) -> TrainResult:
    run_dir = Path(cfg.out)
    mc = model_config_for(cfg)
    manifest = data_checks(cfg, mc)
    accum = grad_accum_steps(cfg, info.world_size)
    global_batch = cfg.batch_size * accum * info.world_size
    seq_len = manifest["seq_len"]
    if not resume and ckpt.latest_checkpoint(run_dir) is not None:
        raise SlmError(f"{run_dir}: already holds checkpoints; pass --resume to continue it, or use a new --out")
    latest = None
    if resume and ckpt.latest_checkpoint(run_dir) is not None:
        latest = ckpt.verified_checkpoint(run_dir)  # newest that matches its checksums; skipped ones named
        if latest is None:
            raise SlmError(f"{run_dir}: no checkpoint matches its checksums (all corrupted); cannot resume")

    seed_everything(cfg.seed + info.rank)
    model = build_training_model(mc, cfg)
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint as activation_checkpoint

        for block in model.layers:
            activation_checkpoint(block)
    model.to(info.device)
    if cfg.compile:
        for block in model.layers:
            block.compile()
    engine = parallelize(model, cfg.parallel, info)
    optimizer = build_optimizer(model, cfg, info.device)
    loader = DataLoader(cfg.data, "train", batch_size=cfg.batch_size, rank=info.rank, world_size=info.world_size,
                        seed=cfg.seed)

    start_step = 0
    if latest is not None:
        c = ckpt.load_checkpoint(latest)
        check_config_unchanged(c, cfg, run_dir / CONFIG_FILE)
        if c.state.get("tokenizer_sha256") != manifest.get("tokenizer", {}).get("sha256"):
            raise SlmError(f"{latest}: trained with another tokenizer than the one of {cfg.data}")
        load_training_checkpoint(c, model, optimizer, loader, info, global_batch)
        start_step = c.step
        del c
        log(f"resuming {run_dir} from {latest.name} (step {start_step})")
    if info.is_main:
        prepare_run_dir(run_dir, cfg, manifest, resumed_at=start_step if latest is not None else None)
    barrier(info)

    amp = autocast(cfg, info.device)
    tokens_per_step = global_batch * seq_len
    peak, peak_source = peak_flops(info.device, cfg.peak_tflops) if info.is_main else (0.0, "")
    flops_step = flops_per_token(mc, seq_len) * tokens_per_step
    metrics = MetricsLog(run_dir, enabled=info.is_main)
    if info.is_main:
        metrics.log({"kind": "start", "step": start_step, "world_size": info.world_size, "grad_accum": accum,
                     "global_batch": global_batch, "tokens_per_step": tokens_per_step,
                     "params": mc.num_params(), "flops_per_token": flops_per_token(mc, seq_len),
                     "peak_flops": peak, "peak_source": peak_source, "device": str(info.device)})
    log(f"training {mc.name} ({mc.num_params() / 1e6:.1f}M params) on {info.world_size} process(es), "
        f"{global_batch} x {seq_len} tokens per step ({accum} micro-batch(es) of {cfg.batch_size} per rank)")
    extra_state = {"global_batch": global_batch, "parallel": cfg.parallel, "config": cfg.to_dict(),
                   "model_config": mc.to_hf(), "tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256")}

    bar = None
    if show_progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    t_start = time.perf_counter()
    t_last, steps_since_log = t_start, 0
    step, last_loss, last_val, saved, stopped_by = start_step, None, None, None, "max_steps"
    # The time budget's last step, decided by rank 0 at log steps (and after the first step) from
    # the measured step time, and shared there: no collective in the steps between.
    stop_at = cfg.max_steps
    t_decided, step_decided = t_start, start_step
    engine.train()
    while step < cfg.max_steps:
        lr = lr_at(cfg, step)
        loss, grad_norm = train_step(engine, model, optimizer, loader, lr, accum, cfg, info, amp)
        step += 1
        steps_since_log += 1
        if bar is not None:
            bar.update(1)

        logging = step % cfg.log_every == 0 or step == cfg.max_steps
        deciding = cfg.time_budget is not None and (logging or step == start_step + 1)
        if logging or deciding:
            last_loss = all_reduce_sum([float(loss)], info)[0] / info.world_size  # waits for the device
        if logging:
            dt = time.perf_counter() - t_last
            tok_s = tokens_per_step * steps_since_log / dt
            metrics.log({"kind": "train", "step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                         "tokens_per_s": tok_s, "mfu": flops_step * steps_since_log / dt / peak if peak else None,
                         "tokens": step * tokens_per_step, "elapsed_s": time.perf_counter() - t_start})
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            t_last, steps_since_log = time.perf_counter(), 0
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            result = evaluate(engine, cfg, info, amp)
            engine.train()
            if result is not None:
                last_val = result[0]
                metrics.log({"kind": "val", "step": step, "val_loss": result[0], "val_ppl": result[1]})
                if bar is not None:
                    bar.write(f"step {step}: val loss {result[0]:.4f}, ppl {result[1]:.2f}")
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if deciding:  # stop before the step that would overrun the budget
            now = time.perf_counter()
            step_s = (now - t_decided) / (step - step_decided)
            fit = math.floor((cfg.time_budget - (now - t_start)) / step_s) if info.is_main else 0
            stop_at = int(all_reduce_max(float(step + max(fit, 0)), info))  # rank 0's decision, for everyone
            t_decided, step_decided = now, step
        out_of_time = step >= stop_at
        if out_of_time and step < cfg.max_steps:
            stopped_by = "time_budget"
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or out_of_time:
            extra_state["train_loss"] = last_loss = all_reduce_sum([float(loss)], info)[0] / info.world_size
            saved = save_training_checkpoint(run_dir, model, optimizer, loader, step, info, cfg, extra_state)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    metrics.log({"kind": "end", "step": step, "stopped_by": stopped_by, "seconds": seconds})
    metrics.close()
    if stopped_by == "time_budget":
        log(f"time budget of {cfg.time_budget:g}s reached at step {step}; checkpoint written")
    return TrainResult(run_dir, step, stopped_by, saved or ckpt.latest_checkpoint(run_dir), last_loss, last_val,
                       (step - start_step) * tokens_per_step, seconds)
