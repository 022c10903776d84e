"""A model directory (or a training run) -> a GGUF file that llama.cpp and Ollama run.

The inverse of `slm.gguf_import`, written as llama.cpp's own `convert_hf_to_gguf.py` writes a
LlamaForCausalLM (through the same `gguf.GGUFWriter`): the `llama.*` keys, the tokenizer as
metadata arrays, llama.cpp's tensor names, the query/key rows permuted for its interleaved RoPE
(the KV-head count for k), and no `output.weight` when the embeddings are tied (llama.cpp then
multiplies by `token_embd.weight`).

    export_gguf("model_dir", "model.gguf", dtype="q8_0")   # slm export --format gguf

dtypes: f32, f16, q8_0 (every matrix Q8_0), q4_0 (the decoder layers' matrices Q4_0, the
embeddings/lm_head Q8_0: slm's int4 keeps its lm_head in int8 for the same reason llama-quantize
keeps `output.weight` above 4 bits, and the two then run the same weights). Norms stay F32, and a
matrix whose rows do not split into 32-value blocks falls back to F16 (as llama.cpp's converter does).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from slm.atomic import remove_tmp, replace_file, tmp_name
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.gguf_import import (
    _BLOCK_NAMES, _BYTE, _CONTROL, _GLOBAL_NAMES, _LLAMA3_SPLIT, _NORMAL, _UNKNOWN, _UNUSED, _USER_DEFINED,
)
from slm.train.export import checkpoint_model
from slm.weights import check_hf_state_dict, read_config, read_hf_state_dict, slm_to_hf

DTYPES = ("f32", "f16", "q8_0", "q4_0")

_TO_GGUF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_TO_GGUF_BLOCK = {hf: g for g, hf in _BLOCK_NAMES.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (the inverse of
    `slm.gguf_import.unpermute_rope`; llama.cpp's `LlamaModel.permute`)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)  # (out, in)


def gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[hf_name]
    m = _HF_LAYER.fullmatch(hf_name)
    if m is None or m.group(2) not in _TO_GGUF_BLOCK:
        raise SlmError(f"tensor {hf_name!r} has no GGUF name (not part of a LLaMA model)")
    return f"blk.{m.group(1)}.{_TO_GGUF_BLOCK[m.group(2)]}"


def _tensor_type(gguf_tensor: str, shape: tuple[int, ...], dtype: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or dtype == "f32":
        return Q.F32
    if dtype == "f16":
        return Q.F16
    quant = Q.Q4_0 if dtype == "q4_0" and gguf_tensor.startswith("blk.") else Q.Q8_0
    return quant if shape[-1] % 32 == 0 else Q.F16  # both formats quantise blocks of 32 along a row


def _encode(w: np.ndarray, qtype):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return quantize(w.astype(np.float32), qtype)  # uint8 blocks; the writer recovers the shape from qtype


# --- the tokenizer -----------------------------------------------------------------------------


def _byte_level_pre(pre_tokenizer: dict | None, path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json byte-level pre-tokenizer (the splits
    `slm.gguf_import` rebuilds for each name)."""
    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False) and p.get("use_regex", True) == regex

    p = pre_tokenizer or {}
    if byte_level(p, True):
        return "gpt2"
    seq = p.get("pretokenizers", []) if p.get("type") == "Sequence" else []
    if len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits") and byte_level(seq[1], True):
        return "smollm"
    if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and byte_level(seq[1], False)):
        return "llama-bpe"
    raise SlmError(f"{path}: this byte-level pre-tokenizer has no llama.cpp equivalent slm knows "
                   f"({json.dumps(p)[:120]})")


def _tokenizer_json_vocab(path: Path, vocab_size: int) -> tuple[list[str], list[int], dict]:
    """Tokens in id order (padded to the model's vocabulary with unused [PADi]) and their GGUF
    types, as llama.cpp's converter assigns them; plus the tokenizer.json itself."""
    from tokenizers import Tokenizer

    spec = json.loads(path.read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values(), default=-1) >= vocab_size:
        raise SlmError(f"{path}: the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                       f"vocabulary of {vocab_size}")
    added = tok.get_added_tokens_decoder()
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [_UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = _CONTROL if added[i].special else _USER_DEFINED
        else:
            types[i] = _NORMAL
    return tokens, types, spec


def _sentencepiece_scores(tokens: list[str], types: list[int], merges: list) -> list[float]:
    """Scores for a SentencePiece BPE vocabulary held as a tokenizer.json (an imported LLaMA GGUF).
    llama.cpp merges the best-scoring adjacent pair first; the merge list's order is that priority
    (`slm.tokenizer.llama_bpe_tokenizer` ranks it by score), so a piece scores minus the rank of
    the first merge that makes it."""
    index = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    made = set()
    for rank, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        i = index.get(left + right)
        if i is not None and i not in made:
            made.add(i)
            scores[i] = -float(rank)
    floor = -float(len(merges))
    return [s if i in made else (floor if types[i] == _NORMAL else 0.0) for i, s in enumerate(scores)]


def _add_tokenizer(writer, tok_dir: Path, config: ModelConfig) -> None:
    from gguf import SpecialVocab

    if (tok_dir / "tokenizer.model").is_file():
        _add_sentencepiece_model(writer, tok_dir / "tokenizer.model", config.vocab_size)
        merges = False
    elif (tok_dir / "tokenizer.json").is_file():
        path = tok_dir / "tokenizer.json"
        tokens, types, spec = _tokenizer_json_vocab(path, config.vocab_size)
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise SlmError(f"{path}: a {model.get('type')} tokenizer has no GGUF form slm writes (BPE only)")
        if model.get("byte_fallback"):  # SentencePiece BPE (LLaMA-2 style), as slm.tokenizer builds it
            for i, t in enumerate(tokens):
                if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                    types[i] = _BYTE
                elif t == model.get("unk_token"):
                    types[i] = _UNKNOWN
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(_sentencepiece_scores(tokens, types, model.get("merges", [])))
            writer.add_token_types(types)
            prepend = any(n.get("type") == "Prepend" for n in (spec.get("normalizer") or {}).get("normalizers", []))
            writer.add_add_space_prefix(prepend)
            merges = False
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_byte_level_pre(spec.get("pre_tokenizer"), path))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            merges = True
    else:
        raise SlmError(f"{tok_dir}: no tokenizer.json or tokenizer.model to put in the GGUF file")
    # gguf warns about post-processor templates it cannot classify (LLaMA's "<s> $A <s> $B" pair
    # template); the ids it needs come from the config below, so the warning would only mislead.
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        special = SpecialVocab(tok_dir, load_merges=merges, n_vocab=config.vocab_size)
    finally:
        vocab_log.setLevel(level)
    # The model's own ids win over the tokenizer files' (they are what generation stops on).
    for kind, i in (("bos", config.bos_id), ("eos", config.eos_id)):
        if i is not None and 0 <= i < config.vocab_size:
            special.special_token_ids[kind] = i
    special.add_to_gguf(writer, quiet=True)


def _add_sentencepiece_model(writer, path: Path, vocab_size: int) -> None:
    """A SentencePiece tokenizer.model, token by token as llama.cpp's converter reads it."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise SlmError(f"{path}: cannot load SentencePiece model ({e})") from None
    if sp.vocab_size() > vocab_size:
        raise SlmError(f"{path}: {sp.vocab_size()} pieces, more than the model's vocabulary of {vocab_size}")
    tokens, scores, types = [f"[PAD{i}]" for i in range(vocab_size)], [-1000.0] * vocab_size, [_UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (_UNKNOWN if sp.IsUnknown(i) else _CONTROL if sp.IsControl(i) else
                    _UNUSED if sp.IsUnused(i) else _BYTE if sp.IsByte(i) else _NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)



# --- writing -----------------------------------------------------------------------------------


def write_gguf(
    out: str | os.PathLike, config: ModelConfig, hf_state: dict[str, torch.Tensor], tokenizer_dir: str | os.PathLike,
    dtype: str = "f32", name: str | None = None, progress: bool = False,
) -> Path:
    """Write Hugging Face-named fp32 tensors and a tokenizer directory as a llama GGUF, atomically."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    if dtype not in DTYPES:
        raise SlmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_hf_state_dict(hf_state, config, "model to export")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[dtype]
    writer = GGUFWriter(tmp, arch="llama")
    try:
        writer.add_name(name or out.stem)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.ffn_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        if dtype in ("q8_0", "q4_0"):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        _add_tokenizer(writer, Path(tokenizer_dir), config)

        for hf_name, t in hf_state.items():
            if hf_name == "lm_head.weight" and config.tie_embeddings:
                continue  # llama.cpp falls back to token_embd.weight when output.weight is absent
            w = t.detach().float()
            if hf_name.endswith("q_proj.weight"):
                w = permute_rope(w, config.n_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = permute_rope(w, config.n_kv_heads)
            g = gguf_name(hf_name)
            qtype = _tensor_type(g, tuple(w.shape), dtype)
            writer.add_tensor(g, _encode(w.numpy(), qtype), raw_dtype=qtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        replace_file(tmp, out)
    except BaseException:
        writer.close()
        remove_tmp(tmp)
        raise
    return out


def export_gguf(
    source: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32",
    tokenizer_dir: str | os.PathLike | None = None, progress: bool | None = None,
) -> Path:
    """A model directory, a training run directory or one checkpoint -> a GGUF file."""
    source = Path(source)
    if progress is None:
        progress = sys.stderr.isatty()
    if (source / "config.json").is_file():  # a model directory
        config = read_config(source)
        hf_state = read_hf_state_dict(source, dtype=torch.float32)
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else source
    else:  # a run or checkpoint: the export to a model directory does the checks
        model, tok_dir = checkpoint_model(source, tokenizer_dir)
        config, hf_state = model.config, slm_to_hf(model.state_dict(), model.config)
    name = source.resolve().name
    return write_gguf(out, config, hf_state, tok_dir, dtype=dtype, name=name, progress=progress)
