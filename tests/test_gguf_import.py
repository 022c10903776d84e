"""GGUF import: small GGUF files written the way llama.cpp's converter writes them (q/k rows
permuted, every supported tensor type), imported and checked against the original weights and
against transformers loading the same file; broken files give one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slm.assets import llama2_vocab_gguf

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.gguf_import import import_gguf, read_gguf

# dim 256 so every row is a whole number of K-quant super-blocks (256 values).
CONFIG = ModelConfig(vocab_size=320, n_layers=2, n_heads=4, n_kv_heads=2, dim=256, ffn_dim=512, max_seq_len=64)

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Byte offsets of the fp16 scales inside one block of each K-quant (ggml-common.h block_qN_K).
# gguf has no K-quant quantiser, so those tensors are random blocks with sane scales.
_K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (Hugging Face halves -> interleaved pairs)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from slm.model import Transformer
    from slm.weights import slm_to_hf
    from conftest import randomize

    model = randomize(Transformer(CONFIG), seed)
    return {k: v.clone() for k, v in slm_to_hf(model.state_dict(), CONFIG).items()}


def _encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    t = GGMLQuantizationType[qtype]
    if qtype not in _K_SCALE_OFFSETS:
        return quantize(w, t)
    block, nbytes = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block, nbytes), dtype=np.uint8)
    for off in _K_SCALE_OFFSETS[qtype]:
        raw[..., off:off + 2] = np.frombuffer(np.float16(2e-3).tobytes(), np.uint8)
    return raw.reshape(w.shape[0], -1)


def write_gguf(path, hf: dict[str, torch.Tensor], qtype: str = "F32", arch: str = "llama", tokenizer=None,
               seed: int = 0):
    """A GGUF as llama.cpp writes it: metadata, permuted q/k, 2-D weights in `qtype`, norms in F32."""
    import gguf

    rng = np.random.default_rng(seed)
    c = CONFIG
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tokenizer is not None:
        tokenizer(w)
    for name, t in hf.items():
        a = t.numpy().astype(np.float32)
        layer, _, short = name.removeprefix("model.layers.").partition(".")
        gname = f"blk.{layer}.{_GGUF_NAMES[short]}" if name.startswith("model.layers.") else _GGUF_NAMES[name]
        if short == "self_attn.q_proj.weight":
            a = llama_cpp_permute(a, c.n_heads)
        elif short == "self_attn.k_proj.weight":
            a = llama_cpp_permute(a, c.n_kv_heads)
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, a)
        else:
            w.add_tensor(gname, _encode(a, qtype, rng), raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _expected(path, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as stored in the file, dequantised by gguf and un-permuted by the test's own inverse."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    inverse = {v: k for k, v in _GGUF_NAMES.items()}
    out = {}
    for t in GGUFReader(str(path)).tensors:
        a = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        layer, _, short = t.name.removeprefix("blk.").partition(".")
        name = f"model.layers.{layer}.{inverse[short]}" if t.name.startswith("blk.") else inverse[t.name]
        heads = {"attn_q.weight": CONFIG.n_heads, "attn_k.weight": CONFIG.n_kv_heads}.get(short)
        if heads:  # invert llama_cpp_permute by permuting back with explicit indices
            out_dim = a.shape[0]
            idx = np.arange(out_dim).reshape(heads, 2, out_dim // heads // 2).swapaxes(1, 2).reshape(-1)
            a = a[np.argsort(idx)]
        out[name] = torch.from_numpy(np.array(a, dtype=np.float32))
    return out


def test_f32_import_is_exact(tmp_path):
    hf = _hf_state()
    config, got, files = read_gguf(write_gguf(tmp_path / "m.gguf", hf))
    assert config == CONFIG
    assert files == {}  # no tokenizer in the file, none written
    assert got.keys() == hf.keys()
    for name in hf:
        assert torch.equal(got[name], hf[name]), name


# Max |error| / max |w| that each format's rounding allows (a bound, not a fitted number).
_REL_ERR = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q5_0": 7e-2, "Q5_1": 7e-2, "Q4_0": 0.15, "Q4_1": 0.15}


@pytest.mark.parametrize("qtype", list(_REL_ERR) + list(_K_SCALE_OFFSETS))
def test_quantized_import_matches_the_file(tmp_path, qtype):
    hf = _hf_state()
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", hf, qtype)
    _, got, _ = read_gguf(path)
    expected = _expected(path, hf)
    for name in hf:
        assert torch.equal(got[name], expected[name]), name
        if qtype in _REL_ERR:  # real quantisation of the original weights: close to them
            err = (got[name] - hf[name]).abs().max() / hf[name].abs().max()
            assert err <= _REL_ERR[qtype], (name, float(err))


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K", "Q6_K"])
def test_logits_match_transformers_loading_the_gguf(tmp_path, qtype):
    transformers = pytest.importorskip("transformers")
    from slm.load import load_model

    path = write_gguf(tmp_path / "m.gguf", _hf_state(), qtype)
    ours = load_model(import_gguf(path, tmp_path / "out"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ours(tokens), ref.eval()(tokens).logits
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def _gpt2_tokenizer(tokenizer_dir):
    """Writes the conftest byte-level BPE tokenizer into a GGUF as llama.cpp's converter would."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    tokens = [t for t, _ in vocab] + ["<pad>"] * (CONFIG.vocab_size - len(vocab))

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in special else 1 for t in tokens[:len(vocab)]] + [5] * (len(tokens) - len(vocab)))
        w.add_token_merges(merges)
        w.add_unk_token_id(0)
        w.add_chat_template("{{ messages[0]['content'] }}")

    return add


def test_embedded_tokenizer_matches_the_original(tmp_path, tokenizer_dir):
    from slm.tokenizer import Tokenizer
    from conftest import TRAIN_TEXT

    path = write_gguf(tmp_path / "m.gguf", _hf_state(), tokenizer=_gpt2_tokenizer(tokenizer_dir))
    out = import_gguf(path, tmp_path / "out")
    ours, original = Tokenizer.load(out), Tokenizer.load(tokenizer_dir)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    for text in [TRAIN_TEXT[:500], "  x\t\n\n 12345 ünïcödé 🙂 <s>a</s>"]:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["chat_template"]) == ("<s>", "</s>", "{{ messages[0]['content'] }}")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_cached_import_is_reused_and_gguf_paths_load(tmp_path, monkeypatch):
    from slm.gguf_import import cached_import
    from slm.load import load_model

    monkeypatch.setenv("SLM_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", _hf_state())
    first = cached_import(path)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_import(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not imported twice
    assert load_model(path).config.dim == CONFIG.dim  # a .gguf path goes through the cache
    write_gguf(path, _hf_state(seed=1))  # a changed file is imported again, elsewhere
    assert cached_import(path) != first


def test_bad_files_give_one_line_errors(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", _hf_state())
    data = good.read_bytes()

    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(SlmError, match=r"magic.gguf: not a GGUF file"):
        read_gguf(tmp_path / "magic.gguf")

    for cut in (20, len(data) // 2):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(SlmError, match=r"cut.gguf: corrupt or truncated"):
            read_gguf(tmp_path / "cut.gguf")

    with pytest.raises(SlmError, match=r"architecture 'gptneox' is not supported"):
        read_gguf(write_gguf(tmp_path / "arch.gguf", _hf_state(), arch="gptneox"))

    with pytest.raises(SlmError, match=r"missing.gguf: no such GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "i8.gguf"), "llama")
    for key, value in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("context_length", 16)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SlmError, match=r"tensor token_embd.weight has type I8"):
        read_gguf(tmp_path / "i8.gguf")


_LLAMA_VOCAB = str(llama2_vocab_gguf() or "")


@pytest.mark.skipif(not _LLAMA_VOCAB, reason="LLaMA-2 vocabulary not fetched: run python scripts/fetch_llama2_vocab.py")
def test_llama_sentencepiece_vocab_matches_llama_cpp():
    """The LLaMA-2 32k vocabulary: our tokenizer.json reproduces llama.cpp's reference tokenisations."""
    from slm.gguf_import import read_tokenizer

    tok = read_tokenizer(_LLAMA_VOCAB)
    texts = open(_LLAMA_VOCAB + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    expected = open(_LLAMA_VOCAB + ".out", encoding="utf-8").read().split("\n")
    assert len(texts) > 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == [int(i) for i in ids.split()], text
