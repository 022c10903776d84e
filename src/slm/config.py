"""Model configurations: one dataclass, an exact-name registry, and conversion
to and from Hugging Face `LlamaConfig` fields (config.json)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from slm.errors import SlmError, UnsupportedModel


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-2-architecture decoder."""

    name: str = "custom"
    vocab_size: int = 32000
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    dim: int = 768
    ffn_dim: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_id: int | None = 2
    extra_hf: dict = field(default_factory=dict, compare=False, repr=False)  # HF fields we carry but do not use

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for f in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "dim", "ffn_dim", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SlmError(f"model config {self.name!r}: {f} must be a positive integer, got {v!r}")
        for f in ("rope_theta", "norm_eps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SlmError(f"model config {self.name!r}: {f} must be a finite number > 0, got {v!r}")
        if self.dim % self.n_heads:
            raise SlmError(f"model config {self.name!r}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise SlmError(
                f"model config {self.name!r}: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise SlmError(f"model config {self.name!r}: head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, hd = self.dim, self.head_dim
        attn = d * (self.n_heads * hd) + 2 * d * (self.n_kv_heads * hd) + (self.n_heads * hd) * d
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + d  # + final norm

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json -------------------------------------------------

    def to_hf(self) -> dict:
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "torch_dtype": "float32",
        }
        # Keep unknown-but-harmless fields we read (e.g. pad_token_id) so a round trip loses nothing.
        for k, v in self.extra_hf.items():
            hf.setdefault(k, v)
        if self.name != "custom":
            hf["slm_config_name"] = self.name
        return hf

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face LlamaConfig dict; refuse what this decoder cannot run."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise UnsupportedModel(f"{source}: model_type {model_type!r} is not a LLaMA-architecture model")
        for key, ok in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None))):
            if key in hf and hf[key] not in ok:
                raise UnsupportedModel(f"{source}: {key}={hf[key]!r} is not supported (expected {ok[0]!r})")
        if hf.get("rope_scaling"):
            raise UnsupportedModel(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported")
        if hf.get("sliding_window") and model_type == "mistral":
            raise UnsupportedModel(f"{source}: sliding-window attention is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise SlmError(f"{source}: missing field(s) {', '.join(missing)}")
        for key in (*required, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if key in hf and not (key in ("num_key_value_heads", "head_dim") and hf[key] is None):
                _positive_int(hf[key], key, source)
        rope_parameters = hf.get("rope_parameters") or {}
        if not isinstance(rope_parameters, dict):
            raise SlmError(f"{source}: rope_parameters must be an object, got {rope_parameters!r}")
        n_heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
            raise UnsupportedModel(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 may nest it under rope_parameters
            rope_theta = rope_parameters.get("rope_theta", 10000.0)
        rope_theta = _positive_float(rope_theta, "rope_theta", source)
        norm_eps = _positive_float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", source)
        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
            "rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "rope_scaling",
            "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "slm_config_name", "transformers_version",
            "rope_parameters",
        }
        extra = {k: v for k, v in hf.items() if k not in known and k in ("pad_token_id", "initializer_range")}
        try:
            return cls(
                name=hf.get("slm_config_name", "custom"),
                vocab_size=hf["vocab_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                dim=hf["hidden_size"],
                ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=rope_theta,
                norm_eps=norm_eps,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_id=hf.get("bos_token_id"),
                eos_id=eos,
                extra_hf=extra,
            )
        except SlmError as e:  # say which file (ModelConfig's own checks name only the config)
            raise SlmError(f"{source}: {e}") from None


def _positive_int(v, key: str, source: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SlmError(f"{source}: {key} must be a positive integer, got {v!r}")
    return v


def _positive_float(v, key: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise SlmError(f"{source}: {key} must be a finite number > 0, got {v!r}")
    return float(v)


# --- the registry: exact names only ------------------------------------------------

_AMD_135M = dict(
    vocab_size=32000, n_layers=12, n_heads=12, n_kv_heads=12, dim=768, ffn_dim=2048,
    max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, bos_id=1, eos_id=2,
)

CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(name="amd-llama-135m", **_AMD_135M),
        # The code variant is the same network continued on code (AMD-Llama-135m-code).
        ModelConfig(name="amd-llama-135m-code", **_AMD_135M),
        ModelConfig(
            name="smollm2-135m", vocab_size=49152, n_layers=30, n_heads=9, n_kv_heads=3, dim=576, ffn_dim=1536,
            max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, bos_id=1, eos_id=2,
        ),
        # A small draft/code model that trains in minutes on a CPU (LLaMA-2 vocabulary).
        ModelConfig(
            name="llama-16m", vocab_size=32000, n_layers=4, n_heads=4, n_kv_heads=4, dim=256, ffn_dim=688,
            max_seq_len=1024, tie_embeddings=True,
        ),
        # The debug config for tests: milliseconds per step.
        ModelConfig(
            name="tiny", vocab_size=256, n_layers=2, n_heads=4, n_kv_heads=2, dim=64, ffn_dim=160,
            max_seq_len=128, tie_embeddings=False,
        ),
    ]
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Look up a registered config by its exact name, optionally overriding fields."""
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise SlmError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
