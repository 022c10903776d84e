"""Model directories: round trips, and clear errors for everything that can be wrong on disk."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slm.config import ModelConfig, get_config
from slm.errors import SlmError
from slm.load import load_model
from slm.weights import hf_to_slm, read_config, save_model, slm_to_hf


def test_round_trip_is_exact(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    out = save_model(model, tmp_path / "copy", tokenizer_dir=tiny_model_dir)
    again = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (out / "tokenizer.json").is_file()
    assert read_config(out) == model.config


def test_name_mapping_round_trip():
    cfg = get_config("tiny")
    hf = {k: torch.randn(v) for k, v in __import__("slm.weights", fromlist=["x"]).expected_hf_shapes(cfg).items()}
    back = slm_to_hf(hf_to_slm(hf, cfg), cfg)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_config_round_trip():
    for name in ("amd-llama-135m", "smollm2-135m", "tiny"):
        cfg = get_config(name)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_unknown_config_name():
    with pytest.raises(SlmError, match="unknown model config 'amd-135m'; known: amd-llama-135m"):
        get_config("amd-135m")


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlmError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[160, 64\], but config\.json implies \[192, 64\]"):
        load_model(d)


def test_missing_and_unexpected_tensors(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.layers.9.extra"] = torch.zeros(2)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(SlmError, match="model.norm.weight is missing"):
        load_model(d)
    tensors["model.norm.weight"] = torch.ones(64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(SlmError, match="unexpected tensor.*model.layers.9.extra"):
        load_model(d)


def test_corrupt_and_missing_files(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlmError, match="model.safetensors: cannot read safetensors file"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(SlmError, match="config.json: not valid JSON"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(SlmError, match="not a model directory"):
        load_model(d)
    with pytest.raises(SlmError, match="no such file"):
        load_model(tmp_path / "nope")


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(SlmError, match="safetensors only"):
        load_model(d)


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlmError, match="model_type 'gpt2' is not a LLaMA-architecture model"):
        load_model(d)


def test_sharded_checkpoint(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
    (d / "model.safetensors").unlink()
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(tiny_model_dir), load_model(d)
    x = torch.arange(10)[None]
    assert torch.equal(a(x), b(x))


def test_failed_save_leaves_previous_directory_intact(tiny_model_dir, tmp_path, monkeypatch):
    out = copy_dir(tiny_model_dir, tmp_path / "m")
    before = sorted(p.name for p in out.iterdir())
    model = load_model(tiny_model_dir)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("slm.weights.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directory left behind
