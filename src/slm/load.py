"""Model arguments: what a MODEL or --draft value names, and loading it.

A model argument is an slm model directory (config.json of a LLaMA-architecture model +
safetensors, `slm.weights`), a .gguf file (imported once into the cache, `slm.gguf_import`), or a
transformers model directory that slm's decoder cannot run (another architecture), which
transformers loads instead. A --draft value may also be "ngram", "int8", "int4" or "auto".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slm.errors import SlmError, UnsupportedModel
from slm.gguf_import import cached_import
from slm.model import Transformer
from slm.quantize import draft_copy, quantized_copy
from slm.speculative.drafts import Draft, HybridDraft, ModelDraft, NgramDraft, SelfDraft
from slm.speculative.features import FeatureDraft, input_embedding, int8_head
from slm.speculative.head import is_head_dir, load_head
from slm.speculative.lm import HFLM, as_lm
from slm.tokenizer import Tokenizer
from slm.weights import build_model, check_hf_state_dict, hf_to_slm, read_config, read_hf_state_dict


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory for `path`: the directory itself, or for a .gguf file its imported copy
    in the cache (imported once, reused while the file is unchanged)."""
    path = Path(path)
    if not path.exists():
        raise SlmError(f"{path}: no such file or directory")
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        return cached_import(path)
    raise SlmError(f"{path}: expected a model directory (config.json + model.safetensors) or a .gguf file")


def is_transformers_dir(path: str | os.PathLike) -> bool:
    """A directory whose config.json is well formed but describes a model slm's decoder does not
    implement (another architecture, or an option such as rope scaling): transformers may still
    run it. A config with invalid values is not one: slm's own error says what is wrong."""
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            return False
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # slm's own error (read_config) says what is wrong
    try:
        read_config(path)
    except UnsupportedModel:
        return True
    except SlmError:
        return False
    return False


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """An slm model directory or .gguf file -> Transformer."""
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    hf_state = read_hf_state_dict(model_dir, dtype=dtype)
    check_hf_state_dict(hf_state, config, str(model_dir))
    return build_model(config, hf_to_slm(hf_state, config), device=device)


def load_transformers(path: str | os.PathLike):
    """A local transformers causal-LM directory (safetensors only, fp32, nothing downloaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SlmError(f"{path}: not a transformers model directory (no config.json)")
    try:
        from transformers import AutoModelForCausalLM  # optional dependency (the 'hf' extra)
    except ImportError:
        raise SlmError("transformers models need the 'hf' extra: pip install 'slm[hf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise SlmError(f"{path}: transformers cannot load this model ({str(e).splitlines()[0]})") from None
    return model.eval()


def load_any(path: str | os.PathLike) -> tuple[object, Path]:
    """A model argument -> (an slm Transformer or a transformers model, its directory: tokenizer,
    chat template)."""
    if is_transformers_dir(path):
        return load_transformers(path), Path(path)
    model_dir = resolve_model_dir(path)
    return load_model(model_dir), model_dir


# --- drafts --------------------------------------------------------------------------------


def check_same_vocabulary(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Refuse a draft whose tokenizer disagrees with the target's on any shared id.

    A draft vocabulary that is a prefix of the target's (or the other way round) is fine: only
    the ids both have are compared, string for string."""
    shared = min(target_tok.vocab_size, draft_tok.vocab_size)
    for i in range(shared):
        a, b = target_tok.id_to_token(i), draft_tok.id_to_token(i)
        if a != b:
            raise SlmError(
                f"draft {draft_name}: its tokenizer differs from the target's ({target_name}) at id {i}: "
                f"{b!r} vs {a!r}; speculative decoding needs a shared vocabulary"
            )


def _tokenizer(path: Path, what: str) -> Tokenizer:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise SlmError(f"{what} {path}: no tokenizer files, so it cannot be checked to share the target's vocabulary")
    return Tokenizer.load(path)


def _self_draft(target, spec: str) -> Transformer:
    """The target's own quantized copy: "int8" (int8 everywhere) or "int4" (slm.quantize.draft_copy)."""
    if not isinstance(target, Transformer):
        raise SlmError(f"draft {spec!r} uses the target's own quantized copy, which needs an slm target model")
    return quantized_copy(target) if spec == "int8" else draft_copy(target)


def load_draft(spec: str, target, target_dir: str | os.PathLike | None = None) -> Draft:
    """Resolve a `--draft` value against the (already loaded) target.

    "ngram": prompt lookup. "int8": the target's own int8 weight-only copy (slm.quantize).
    "int4": its copy with int4 decoder layers and an int8 lm_head (`slm.quantize.draft_copy`:
    cheaper than int8, nearly as often right). "auto": prompt lookup where a 2+-token n-gram
    matches, else the int4 copy (`HybridDraft`).
    A distilled draft directory (`slm distill`, recognised by its draft_head.json): its head on
    the target's features; "auto:DIR" puts prompt lookup in front of it as "auto" does for int4.
    "hf:DIR" or a transformers directory (`is_transformers_dir`): a transformers draft.
    Otherwise an slm model directory or .gguf file. Model drafts must share the target's tokenizer.
    """
    target_vocab = as_lm(target).vocab_size
    if spec == "ngram":
        return NgramDraft()
    if spec in ("int8", "int4", "auto"):
        model_draft = SelfDraft(_self_draft(target, "int4" if spec == "auto" else spec), target)
        return HybridDraft(NgramDraft(min_ngram=2), model_draft) if spec == "auto" else model_draft

    if spec.startswith("auto:"):
        return HybridDraft(NgramDraft(min_ngram=2), load_distilled(spec[5:], target))
    if Path(spec).is_dir() and is_head_dir(spec):
        return load_distilled(spec, target)

    force_hf = spec.startswith("hf:")
    path = Path(spec[3:] if force_hf else spec)
    if not path.exists():
        raise SlmError(
            f"draft {path}: no such file or directory (expected a model directory, a .gguf, 'ngram', 'int8', 'int4' or 'auto')"
        )
    hf = force_hf or is_transformers_dir(path)
    if not hf:
        path = resolve_model_dir(path)  # a .gguf becomes its imported model directory
        read_config(path)  # its config's error, before the tokenizer check
    if target_dir is not None:  # before loading any weights
        check_same_vocabulary(
            _tokenizer(Path(target_dir), "target"), _tokenizer(path, "draft"), str(target_dir), str(path)
        )
    lm = HFLM(load_transformers(path)) if hf else as_lm(load_model(path))
    return ModelDraft(lm, target_vocab)


def load_distilled(path: str | os.PathLike, target) -> FeatureDraft:
    """A distilled draft directory (`slm.distill`) -> its FeatureDraft on this (loaded) target."""
    if not is_head_dir(path):
        raise SlmError(f"draft {path}: not a distilled draft directory (no draft_head.json)")
    head = load_head(path, input_embedding(target))
    return FeatureDraft(int8_head(head), target)  # decoding only: training and saving keep the fp32 head
