"""Shared fixtures: a small byte-level BPE tokenizer and tiny random model directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub; make the HF libraries fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

TRAIN_TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
    "The quick brown fox jumps over the lazy dog. 0123456789 éèà ü 日本語 🙂\n"
) * 20


def make_tokenizer_dir(path: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE tokenizer (<unk>=0, <s>=1, </s>=2) that slm and transformers both load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 128,
    }))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


def make_model_dir(path: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides) -> Path:
    """A tiny random slm model saved as a Hugging Face model directory."""
    from slm.config import get_config
    from slm.model import Transformer
    from slm.weights import save_model

    if tokenizer_dir is not None and "vocab_size" not in overrides:
        from slm.tokenizer import Tokenizer

        overrides["vocab_size"] = Tokenizer.load(tokenizer_dir).vocab_size
    model = Transformer(get_config("tiny", **overrides))
    randomize(model, seed)
    return save_model(model, path, tokenizer_dir=tokenizer_dir)


@torch.no_grad()
def randomize(model, seed: int = 0):
    """AMD init, plus norm weights away from 1 and larger output projections, so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(("wo.weight", "w2.weight")):
            p.mul_(10.0)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny", tokenizer_dir)
