"""GGUF (llama.cpp's file format) -> a Hugging Face model directory.

A GGUF holds the config as `llama.*` metadata, the weights under llama.cpp's tensor
names (quantised or not), and the tokenizer as metadata arrays (tokens, merges or
scores, token types). We dequantise every tensor to fp32 with the `gguf` package,
undo llama.cpp's rotary permutation of the query/key weights, rename to Hugging Face
names, and rebuild a `tokenizer.json` for the `tokenizers` library.

    import_gguf("model.gguf", "out_dir")      # slm import
    cached_import("model.gguf")               # once per file, into the slm cache
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.paths import cache_dir
from slm.tokenizer import llama_bpe_tokenizer
from slm.weights import check_hf_state_dict, check_out_dir, save_hf_dir

# What we dequantise (gguf.quants implements each in numpy). Others (IQ*, TQ*, MXFP4) are refused.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Byte-level BPE pre-tokenisation by `tokenizer.ggml.pre`: how the text is split before the
# merges run, as llama.cpp does it for that name (llama-vocab.cpp).
_GPT2_PRE = {"default", "gpt2", "gpt-2", "starcoder", "refact", "olmo", "jais"}
_DIGITS_PRE = {"smollm"}  # each digit its own piece, then GPT-2's split (as SmolLM's tokenizer.json)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"}


# --- reading -------------------------------------------------------------------------------


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise SlmError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SlmError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OSError, struct.error, UnicodeDecodeError) as e:
        # GGUFReader reads through a memmap: a truncated file fails somewhere inside with a bare error.
        raise SlmError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


class _Metadata:
    """Typed access to the key/value metadata of a GGUF file, with errors that name the file and key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise SlmError(f"{self.path}: cannot read metadata {key} ({e})") from None

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise SlmError(f"{self.path}: metadata {key} must be a positive integer, got {value!r}")
        return int(value)

    def positive_float(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
                or value <= 0:
            raise SlmError(f"{self.path}: metadata {key} must be a finite number > 0, got {value!r}")
        return _f32(value)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise SlmError(f"{self.path}: metadata {key} is missing")
        return value


def config_from_metadata(meta: _Metadata, vocab_size: int, tied: bool) -> ModelConfig:
    """ModelConfig from `llama.*` metadata; refuse what our decoder cannot run."""
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise SlmError(f"{meta.path}: architecture {arch!r} is not supported (only 'llama')")
    for key in ("llama.expert_count", "llama.rope.scaling.type", "llama.attention.sliding_window"):
        value = meta.get(key)
        if value not in (None, 0, "none"):
            raise SlmError(f"{meta.path}: {key}={value!r} is not supported")
    n_heads = meta.positive_int("llama.attention.head_count")
    dim = meta.positive_int("llama.embedding_length")
    rope_dim = meta.get("llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != dim // n_heads:
        raise SlmError(f"{meta.path}: partial rotary embeddings (rope.dimension_count={rope_dim}) are not supported")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    fields = dict(
        vocab_size=vocab_size,
        n_layers=meta.positive_int("llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=meta.positive_int("llama.attention.head_count_kv", n_heads),
        dim=dim,
        ffn_dim=meta.positive_int("llama.feed_forward_length"),
        max_seq_len=meta.positive_int("llama.context_length", 2048),
        rope_theta=meta.positive_float("llama.rope.freq_base", 10000.0),
        norm_eps=meta.positive_float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings=tied,
        bos_id=meta.get("tokenizer.ggml.bos_token_id", 1),
        eos_id=meta.get("tokenizer.ggml.eos_token_id", 2),
        extra_hf={} if pad is None else {"pad_token_id": int(pad)},
    )
    try:
        return ModelConfig(**fields)
    except SlmError as e:  # ModelConfig's own checks (e.g. heads not dividing the width): name the file
        raise SlmError(f"{meta.path}: {e}") from None


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise SlmError(f"{path}: tensor {gguf_name!r} is not part of a LLaMA model (unsupported variant)")


def _dequantize(t, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize

    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise SlmError(f"{path}: tensor {t.name} has type {qtype}, which slm cannot dequantise "
                       f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists dims innermost first
    try:
        w = dequantize(t.data, t.tensor_type).reshape(shape)
    except ValueError as e:
        raise SlmError(f"{path}: tensor {t.name} ({qtype}, shape {list(shape)}) is corrupt ({e})") from None
    return torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy out of the memmap


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)...;
    Hugging Face rotates halves (x_i, x_{i+hd/2}), so the converter reorders each head's rows
    from [first half, second half] to interleaved. Reverse that here."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)  # (out, in)


def read_gguf(path: str | os.PathLike, progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """A llama-architecture GGUF -> (config, fp32 tensors by Hugging Face name, tokenizer files by name)."""
    from tqdm import tqdm

    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise SlmError(f"{path}: tensor token_embd.weight is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    config = config_from_metadata(meta, vocab_size, tied="output.weight" not in tensors)

    hf: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantising {path.name}", unit="tensor", disable=not progress):
        name = _hf_name(t.name, path)
        w = _dequantize(t, path)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, config.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, config.n_kv_heads)
        hf[name] = w

    check_hf_state_dict(hf, config, str(path))
    return config, hf, tokenizer_files(meta, config)


# --- the tokenizer ---------------------------------------------------------------------------


def read_tokenizer(path: str | os.PathLike):
    """The tokenizer embedded in a GGUF file (a vocabulary-only file too) as a `tokenizers.Tokenizer`."""
    path = Path(path)
    meta = _Metadata(_open(path), path)
    if meta.get("tokenizer.ggml.model") is None:
        raise SlmError(f"{path}: no embedded tokenizer (tokenizer.ggml.model is missing)")
    return _build_tokenizer(meta)


def _build_tokenizer(meta: _Metadata):
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        return _byte_level_bpe(meta, tokens, types)
    if kind == "llama":
        return _sentencepiece_bpe(meta, tokens, types)
    raise SlmError(f"{meta.path}: tokenizer type {kind!r} is not supported (only 'gpt2' and 'llama')")


def tokenizer_files(meta: _Metadata, config: ModelConfig) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json text for the embedded tokenizer
    ({} when the file has none)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return {}
    tokens = meta.require("tokenizer.ggml.tokens")
    if len(tokens) != config.vocab_size:
        raise SlmError(f"{meta.path}: the tokenizer has {len(tokens)} tokens but token_embd.weight has "
                       f"{config.vocab_size} rows")
    tok = _build_tokenizer(meta)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    gen_config = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id}
    if "pad_token_id" in config.extra_hf:
        gen_config["pad_token_id"] = config.extra_hf["pad_token_id"]
    return {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(gen_config, indent=2) + "\n",
    }


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Control tokens (<|im_start|>, <s>) are matched whole and are special (skipped when decoding);
    user-defined ones are matched whole but decoded as text. llama.cpp does both."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])


def _byte_level_bpe(meta: _Metadata, tokens: list[str], types: list[int]):
    """GPT-2-style byte-level BPE: the vocabulary is already spelled in GPT-2's byte alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = []
    for m in meta.require("tokenizer.ggml.merges"):
        parts = m.split(" ")
        if len(parts) != 2:
            raise SlmError(f"{meta.path}: malformed tokenizer merge {m!r}")
        merges.append((parts[0], parts[1]))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in _DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise SlmError(f"{meta.path}: byte-level pre-tokenizer {pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_special_tokens(tok, tokens, types)
    return tok


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], types: list[int]):
    """SentencePiece BPE (LLaMA-1/2) as a `tokenizers` BPE with byte fallback: the same conversion
    `slm tokenizer train` uses for its own tokenizer.model (`slm.tokenizer.llama_bpe_tokenizer`)."""
    tok = llama_bpe_tokenizer(
        pieces=tokens,
        scores=meta.require("tokenizer.ggml.scores"),
        mergeable=[ty == _NORMAL for ty in types],
        unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
        bos_id=meta.get("tokenizer.ggml.bos_token_id", 1),
        eos_id=meta.get("tokenizer.ggml.eos_token_id", 2),
        add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
    )
    _add_special_tokens(tok, tokens, types)
    return tok


# --- writing -----------------------------------------------------------------------------------


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool | None = None) -> Path:
    """Convert a llama-architecture GGUF to a model directory (fp32 safetensors + tokenizer), atomically."""
    check_out_dir(out_dir)  # before the slow part
    if progress is None:
        progress = sys.stderr.isatty()
    config, hf, files = read_gguf(gguf_path, progress=progress)
    return save_hf_dir(out_dir, config, hf, extra_files=files)


def cached_import(gguf_path: str | os.PathLike) -> Path:
    """The model directory for a GGUF file, imported once into the slm cache and reused while
    the file (its size and modification time) is unchanged."""
    path = Path(gguf_path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise SlmError(f"{gguf_path}: cannot read GGUF file ({e.strerror})") from None
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return import_gguf(path, out)
