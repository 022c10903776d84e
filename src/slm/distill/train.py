"""Training the head within a time budget: AdamW, warmup, gradient clipping, a tqdm bar, and
checkpoints as `slm train` writes them (`slm.train.checkpoint`: atomic, marked complete, the
newest complete one resumed, optimizer and RNG state our own files read with weights_only=True).

The target is not in the loop: its features and labels were computed once (`slm.distill.cache`),
so a step costs only the head's forward and backward (the target's forward per training token
cost about as much as the head's at depth 4, and would be repeated every epoch)."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slm.distill.cache import FeatureCache
from slm.distill.objective import Batch, head_loss, make_batch
from slm.distill.samples import Samples
from slm.errors import SlmError
from slm.speculative.head import FeatureHead
from slm.train.checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint


@dataclass
class TrainSettings:
    seconds: float  # the training budget (wall clock, this run and resumed ones together)
    batch_size: int = 8
    seq_len: int = 256
    depth: int = 2  # training-time-test unroll (EAGLE-3 uses 7; 2 led 4 at every position after 3.5 min: docs/distill.md)
    lr: float = 3e-3  # led 1e-3 after 3.5 min (docs/distill.md)
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    checkpoint_every_s: float = 120.0
    keep_last: int = 2
    seed: int = 0


def _batches(samples: Samples, cache: FeatureCache, s: TrainSettings, rng: random.Random, pad_id: int):
    order = list(range(len(samples.sequences)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - s.batch_size + 1 if len(order) >= s.batch_size else 1, s.batch_size):
            idx = order[i : i + s.batch_size]
            yield make_batch([samples.sequences[j] for j in idx], [samples.prompt_lens[j] for j in idx],
                             cache.select(idx), s.seq_len, pad_id)


def _lr(step: int, s: TrainSettings, frac: float) -> float:
    """Linear warmup, then cosine to 10% over the time budget (the run's length is its time)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_head(
    head: FeatureHead,
    samples: Samples,
    cache: FeatureCache,
    settings: TrainSettings,
    run_dir: Path,
    state: dict,
    pad_id: int = 0,
    on_time: Callable[[float, FeatureHead], None] | None = None,
) -> dict:
    """Train until `settings.seconds` of training have passed (resuming the newest checkpoint in
    run_dir if any). on_time(trained_seconds, head) is called after every step (snapshots).
    `state` (what the run was made from) must match a checkpoint's to resume it."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    step, trained, log, tokens = 0, 0.0, [], 0
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        ckpt = load_checkpoint(latest)
        if ckpt.state.get("made_from") != state:
            raise SlmError(f"{run_dir}: holds a distillation of other settings or data; use another --out or delete it")
        head.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng[0])
        step, trained, log = ckpt.step, ckpt.state["trained_seconds"], ckpt.state["log"]
        tokens = ckpt.state.get("train_tokens", 0)
    rng = random.Random(settings.seed + step)
    batches = _batches(samples, cache, settings, rng, pad_id)
    head.train()
    bar = tqdm(total=round(settings.seconds), initial=min(round(trained), round(settings.seconds)), unit="s",
               desc="distilling", file=sys.stderr, dynamic_ncols=True, leave=False)
    last_ckpt = time.perf_counter()
    while trained < settings.seconds:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = _lr(step, settings, trained / settings.seconds)
        batch: Batch = next(batches)
        loss, stats = head_loss(head, batch, settings.depth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        step += 1
        tokens += batch.tokens.numel()
        dt = time.perf_counter() - t0
        trained += dt
        bar.update(min(round(trained), round(settings.seconds)) - bar.n)
        agree = [a / max(c, 1) for a, c in zip(stats["agree"], stats["counted"])]
        log.append({"step": step, "trained_seconds": round(trained, 2), "loss": round(loss.item(), 4),
                    "agree_by_depth": [round(a, 4) for a in agree], "mass_out": round(stats["mass_out"], 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{agree[0]:.2f}")
        if on_time is not None:
            on_time(trained, head)
        if time.perf_counter() - last_ckpt > settings.checkpoint_every_s or trained >= settings.seconds:
            head_state = {k: v for k, v in head.state_dict().items()}
            save_checkpoint(run_dir, step, head_state, opt.state_dict(), [capture_rng()],
                            {"made_from": state, "trained_seconds": trained, "log": log, "train_tokens": tokens}, settings.keep_last)
            last_ckpt = time.perf_counter()
    bar.close()
    head.eval()
    return {"steps": step, "trained_seconds": round(trained, 1), "log": log, "train_tokens": tokens}
