"""Shared by the tests of slm.eval: a small random model directory whose tokenizer both slm and
transformers/lm_eval load, trained on the fixture texts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def fixture_texts() -> list[str]:
    texts = []
    for f in sorted(FIXTURES.rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def make_tokenizer_dir(out: Path, vocab_size: int = 500, add_bos: bool = False) -> Path:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json); with add_bos, its
    post-processor prepends <s>, so transformers' encode() does too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(fixture_texts(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 128}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def make_model_dir(root: Path, add_bos: bool = False, seed: int = 0, max_seq_len: int = 128) -> Path:
    from slm.config import get_config
    from slm.model import Transformer
    from slm.tokenizer import Tokenizer
    from slm.weights import save_model

    tok_dir = make_tokenizer_dir(root / "tokenizer", add_bos=add_bos)
    tok = Tokenizer.load(tok_dir)
    config = get_config("tiny").replace(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                        max_seq_len=max_seq_len)
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    # Random init gives near-uniform predictions; somewhat sharper logits make choices differ more
    # (per-token log-probs stay in a realistic range, so fp32 sums keep ~1e-5 absolute precision).
    with torch.no_grad():
        model.output.weight.mul_(2.0)
    return save_model(model, root / "model", tokenizer_dir=tok_dir)
