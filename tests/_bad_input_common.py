"""Shared pieces of the bad-input tests: a tiny trained run, a tiny GGUF, directory snapshots."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from conftest import TRAIN_TEXT


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under `root` with its size and modification time (what 'nothing
    changed, nothing left behind' compares)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else None, st.st_mtime_ns)
    return out


def prepare_tiny_data(root: Path, tokenizer_dir: Path, n_docs: int = 20) -> Path:
    """ROOT/data: `n_docs` documents of random TRAIN_TEXT lines, windows of 32 tokens, 10% validation."""
    from slm.data.prepare import PrepareConfig, prepare
    from slm.data.sources import parse_source

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    lines = TRAIN_TEXT.splitlines()
    for i in range(n_docs):
        (corpus / f"doc{i:03d}.txt").write_text("\n".join(rng.choice(lines) for _ in range(40)))
    prepare(PrepareConfig(sources=[parse_source(f"text:{corpus}")], tokenizer=str(tokenizer_dir),
                          out=root / "data", seq_len=32, val_fraction=0.1))
    return root / "data"


def train_tiny_run(data_dir: Path, out: Path, max_steps: int = 4) -> Path:
    """A run of the tiny config with checkpoints at steps 2 and 4."""
    from slm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--config", "tiny", "--vocab-size", "320", "--data", str(data_dir), "--out", str(out),
                     "--max-steps", str(max_steps), "--batch-size", "2", "--global-batch", "2", "--warmup-steps", "1",
                     "--lr", "3e-3", "--min-lr", "3e-4", "--checkpoint-every", "2", "--keep-last", "3",
                     "--eval-every", "0", "--log-every", "1", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def resume_args(run: Path) -> list[str]:
    return ["train", "--out", str(run), "--resume", "--json"]


def rewrite_checksums(ckpt_dir: Path) -> None:
    """Make checksums.json match the (tampered) files: a hand-crafted checkpoint, not a flipped bit."""
    from slm.paths import file_sha256
    from slm.train.checkpoint import _CHECKED, CHECKSUMS

    (ckpt_dir / CHECKSUMS).write_text(json.dumps({n: file_sha256(ckpt_dir / n) for n in _CHECKED}))


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def newest_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def write_tiny_gguf(path: Path, monkeypatch=None, **meta) -> Path:
    """A small llama GGUF (tests/test_gguf_import's writer); `meta` replaces what the writer's
    add_<field> calls write, e.g. head_count=0 or layer_norm_rms_eps=float('nan')."""
    import gguf
    from test_gguf_import import _hf_state, write_gguf

    for field, value in meta.items():
        original = getattr(gguf.GGUFWriter, f"add_{field}")
        monkeypatch.setattr(gguf.GGUFWriter, f"add_{field}",
                            lambda self, _v, _o=original, _value=value: _o(self, _value))
    try:
        return write_gguf(path, _hf_state())
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
