"""Training configuration: AMD's recipes, overrides, batch geometry, the LR schedule, resume rules."""

from __future__ import annotations

import math

import pytest

from slm.errors import SlmError
from slm.train.recipes import (
    TrainConfig, grad_accum_steps, load_config, lr_at, merge_for_resume, resolve, save_config,
)

BASE = {"model": "tiny", "data": "D", "out": "O"}


def test_amd_pretrain_defaults_are_amds_published_hyperparameters():
    cfg = resolve("amd-pretrain", **BASE)
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (0.9, 0.95, 1e-8)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps) == (6e-4, 6e-5, 2000)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.seed, cfg.global_batch) == (0.1, 1.0, 3407, 1024)
    assert grad_accum_steps(cfg, world_size=4) == 1024 // (cfg.batch_size * 4)


def test_amd_code_halves_the_lr_and_needs_a_starting_model():
    with pytest.raises(SlmError, match="--init-from"):
        resolve("amd-code", **BASE)
    cfg = resolve("amd-code", **{**BASE, "init_from": "M"})
    assert (cfg.lr, cfg.min_lr, cfg.recipe) == (3e-4, 3e-5, "amd-code")


def test_overrides_win_and_none_means_not_given():
    cfg = resolve("amd-code", **{**BASE, "init_from": "M", "lr": 1e-4, "min_lr": None, "seed": 1})
    assert (cfg.lr, cfg.min_lr, cfg.seed) == (1e-4, 3e-5, 1)


@pytest.mark.parametrize("bad, match", [
    ({"recipe_": 1}, "unknown training option"),
    ({"parallel": "tp"}, "--parallel"),
    ({"min_lr": 1e-2}, "min_lr <= lr"),
    ({"global_batch": 8, "grad_accum": 2}, "not both"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"time_budget": -1.0}, "--time-budget"),
])
def test_bad_options_are_refused_with_a_message(bad, match):
    with pytest.raises(SlmError, match=match):
        resolve("amd-pretrain", **BASE, **bad)
    with pytest.raises(SlmError, match="unknown training recipe"):
        resolve("amd-posttrain", **BASE)


def test_global_batch_geometry():
    cfg = resolve("amd-pretrain", **BASE, global_batch=24, batch_size=4)
    assert grad_accum_steps(cfg, 1) == 6 and grad_accum_steps(cfg, 2) == 3 and grad_accum_steps(cfg, 3) == 2
    with pytest.raises(SlmError, match="not a multiple of --batch-size 4 x 4 rank"):
        grad_accum_steps(cfg, 4)
    cfg = resolve("amd-pretrain", **BASE, grad_accum=5, batch_size=4)
    assert cfg.global_batch is None and grad_accum_steps(cfg, 2) == 5


def test_lr_schedule_warms_up_linearly_then_cosine_to_min_lr():
    cfg = resolve("amd-pretrain", **BASE, max_steps=12_000)
    assert lr_at(cfg, 0) == pytest.approx(6e-4 / 2000)
    assert lr_at(cfg, 999) == pytest.approx(6e-4 / 2)
    assert lr_at(cfg, 1999) == pytest.approx(6e-4)
    assert lr_at(cfg, 2000) == pytest.approx(6e-4)
    assert lr_at(cfg, 7000) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half-way through the cosine
    assert lr_at(cfg, 12_000) == pytest.approx(6e-5) and lr_at(cfg, 50_000) == pytest.approx(6e-5)
    values = [lr_at(cfg, s) for s in range(2000, 12_001, 500)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert math.isclose(lr_at(cfg, 4500), 6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * 5.4e-4)


def test_saved_config_round_trips_and_resume_allows_only_harmless_changes(tmp_path):
    cfg = resolve("amd-pretrain", **BASE, max_steps=100)
    save_config(cfg, tmp_path / "c.json")
    saved = load_config(tmp_path / "c.json")
    assert saved == cfg
    resumed = merge_for_resume(saved, {"time_budget": 60.0, "keep_last": 1, "lr": None, "parallel": "fsdp"}, "c.json")
    assert (resumed.time_budget, resumed.keep_last, resumed.lr, resumed.parallel) == (60.0, 1, 6e-4, "fsdp")
    assert merge_for_resume(saved, {"lr": 6e-4}, "c.json") == saved  # same value: not a change
    with pytest.raises(SlmError, match=r"changed configuration \(batch_size: 8 -> 4, max_steps: 100 -> 200\)"):
        merge_for_resume(saved, {"max_steps": 200, "batch_size": 4}, "c.json")


def test_every_field_has_help_for_the_cli():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))
