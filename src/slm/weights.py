"""Model directories: the one on-disk format (Hugging Face's).

A model directory holds `config.json` (LlamaConfig fields), `model.safetensors` (or
sharded `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`) with
Hugging Face tensor names, and tokenizer files. (`slm.load` resolves a model argument, a
directory or a .gguf, and loads it.) slm's own module layout fuses q/k/v and
gate/up (see `slm.model`); the mapping lives here and only here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slm.atomic import (
    atomic_dir, check_replaceable_dir, remove_tmp, replace_file, tmp_name, write_json, write_text,
)
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

# Per-layer HF names that map one-to-one onto ours.
_LAYER_SIMPLE = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM checkpoint of this config must hold, with its shape."""
    d, hd, f = config.dim, config.head_dim, config.ffn_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (config.n_heads * hd, d),
            p + "self_attn.k_proj.weight": (config.n_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (config.n_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, config.n_heads * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
    return shapes


def check_hf_state_dict(hf: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Refuse a checkpoint that does not match the config: name the tensor and both shapes."""
    expected = expected_hf_shapes(config)
    for name, shape in expected.items():
        if name not in hf:
            raise SlmError(f"{source}: tensor {name} is missing (config {config.name!r} expects shape {list(shape)})")
        got = tuple(hf[name].shape)
        if got != shape:
            raise SlmError(f"{source}: tensor {name} has shape {list(got)}, but config.json implies {list(shape)}")
    # A tied model's checkpoint may still carry lm_head (equal to the embeddings); anything else is unknown.
    extra = [k for k in hf if k not in expected and not (k == "lm_head.weight" and config.tie_embeddings)]
    extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]  # old transformers saved this buffer
    if extra:
        raise SlmError(f"{source}: unexpected tensor(s) {', '.join(sorted(extra)[:5])} for config {config.name!r}")


def hf_to_slm(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face LLaMA tensor names -> slm's (fusing q/k/v and gate/up). Assumes check_hf_state_dict passed."""
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    out["output.weight"] = out["tok_embeddings.weight"] if config.tie_embeddings else hf["lm_head.weight"]
    for i in range(config.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for hf_name, name in _LAYER_SIMPLE.items():
            out[q + name] = hf[p + hf_name]
        out[q + "attention.wqkv.weight"] = torch.cat([hf[p + n] for n in _QKV], dim=0)
        out[q + "feed_forward.w13.weight"] = torch.cat([hf[p + n] for n in _GATE_UP], dim=0)
    return out


def slm_to_hf(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """slm names -> Hugging Face LLaMA names (splitting the fused projections)."""
    hd = config.head_dim
    qkv_split = [config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd]
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(config.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for hf_name, name in _LAYER_SIMPLE.items():
            out[p + hf_name] = sd[q + name]
        for n, t in zip(_QKV, sd[q + "attention.wqkv.weight"].split(qkv_split, dim=0)):
            out[p + n] = t
        for n, t in zip(_GATE_UP, sd[q + "feed_forward.w13.weight"].chunk(2, dim=0)):
            out[p + n] = t
    return out


# --- reading ---------------------------------------------------------------------------


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise SlmError(f"{model_dir}: not a model directory (no config.json)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise SlmError(f"{path}: expected a JSON object")
    return ModelConfig.from_hf(hf, source=str(path))


def _safetensors_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SlmError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise SlmError(f"{index}: lists {f.name}, which is missing")
        return files
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise SlmError(f"{model_dir}: only pickle weights (.bin/.pt) found; slm loads safetensors only")
    raise SlmError(f"{model_dir}: no model.safetensors")


def read_hf_state_dict(model_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, by Hugging Face name."""
    model_dir = Path(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    tensors[name] = t.to(dtype) if dtype is not None else t
        except (SafetensorError, OSError, RuntimeError) as e:
            raise SlmError(f"{f}: cannot read safetensors file ({e})") from None
    return tensors


def build_model(config: ModelConfig, slm_state: Mapping[str, torch.Tensor], device="cpu") -> Transformer:
    """Construct on the meta device and adopt the given tensors (no random init, no copy)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(dict(slm_state), strict=True, assign=True)
    if config.tie_embeddings:  # assign=True gives each key its own Parameter; re-tie them
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers("cpu")  # buffers are still on meta; the weights are real CPU tensors now
    return model.to(device).eval()


# --- writing ---------------------------------------------------------------------------


# Everything a model directory slm writes may hold: a directory with anything else (notes, data, a
# run directory) is never replaced by `save_hf_dir`.
MODEL_FILES = frozenset({"config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES})


def is_model_dir(path: Path) -> bool:
    """A model directory as slm writes one: config.json plus model files and tokenizer files, nothing else."""
    names = {p.name for p in path.iterdir()}
    shards = {n for n in names if n.startswith("model-") and n.endswith(".safetensors")}
    return "config.json" in names and not (names - MODEL_FILES - shards) and not any(
        (path / n).is_dir() for n in names
    )


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Fail early (before any slow work) when `out_dir` is not a directory a model may be written to."""
    return check_replaceable_dir(out_dir, is_model_dir, "model directory")


def save_hf_dir(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    hf_state: Mapping[str, torch.Tensor],
    tokenizer_dir: str | os.PathLike | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a model directory from Hugging Face-named tensors, atomically."""
    out_dir = Path(out_dir)
    check_hf_state_dict(hf_state, config, "model to save")
    unknown = sorted(set(extra_files or ()) - MODEL_FILES)
    if unknown:  # the directory must stay recognisable as a model directory (see is_model_dir)
        raise ValueError(f"save_hf_dir: extra file(s) {unknown} are not model directory files")
    with atomic_dir(out_dir, is_model_dir, "model directory") as tmp:
        # safetensors refuses shared or non-contiguous storage: give each tensor its own copy.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config.to_hf())
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
    return out_dir


def save_model(
    model: Transformer, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write `model` as a Hugging Face model directory (loadable by transformers and slm)."""
    sd = {k: v for k, v in model.state_dict().items()}
    return save_hf_dir(out_dir, model.config, slm_to_hf(sd, model.config), tokenizer_dir=tokenizer_dir)


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            tmp = tmp_name(dst_dir / name)
            try:
                shutil.copyfile(src_dir / name, tmp)
                replace_file(tmp, dst_dir / name)
            except BaseException:
                remove_tmp(tmp)
                raise
            copied.append(name)
    return copied
