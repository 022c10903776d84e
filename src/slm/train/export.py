"""A training checkpoint -> a model directory (Hugging Face format, with the run's tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

from slm.config import ModelConfig
from slm.paths import file_sha256
from slm.errors import SlmError
from slm.model import Transformer
from slm.train import checkpoint as ckpt
from slm.weights import build_model, check_out_dir, save_model


def export(path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Export the newest complete checkpoint of a run directory (or the given checkpoint directory).

    The tokenizer comes from `tokenizer_dir`, else the copy the run keeps in RUN_DIR/tokenizer,
    and must be the one the checkpoint was trained with (sha256 of its tokenizer file).
    """
    check_out_dir(out_dir)
    model, tok_dir = checkpoint_model(path, tokenizer_dir)
    return save_model(model, out_dir, tokenizer_dir=tok_dir)


def checkpoint_model(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> tuple[Transformer, Path]:
    """The model of a run's newest complete checkpoint (or of the given checkpoint) and its
    tokenizer directory, checked to be the one it was trained with (see `export`)."""
    c = ckpt.resolve_checkpoint(path)
    state = ckpt.read_state(c)
    config = ModelConfig.from_hf(state["model_config"], source=f"{c}/state.json")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else c.parent.parent / "tokenizer"
    tok_files = [tok_dir / n for n in ("tokenizer.json", "tokenizer.model") if (tok_dir / n).is_file()]
    if not tok_files:
        raise SlmError(f"{tok_dir}: no tokenizer.json or tokenizer.model to put in the model directory (give --tokenizer)")
    want = state.get("tokenizer_sha256")
    if want and file_sha256(tok_files[0]) != want:
        raise SlmError(f"{tok_files[0]}: not the tokenizer this checkpoint was trained with (sha256 differs)")
    return build_model(config, ckpt.read_model_state(c)), tok_dir
