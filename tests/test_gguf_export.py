"""GGUF export: slm model directories written as llama GGUF files, checked against an independent
loader (transformers' `from_pretrained(gguf_file=...)`: its own tensor names, inverse permutation
and tokenizer conversion), against slm's own import (tensors bit for bit), against gguf's
quantisers, and against llama.cpp's reference tokenisations for the LLaMA-2 vocabulary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _data_common import train_tiny_tokenizer
from conftest import make_model_dir

from slm.assets import llama2_vocab_gguf
from slm.cli import main
from slm.errors import SlmError
from slm.gguf_export import export_gguf, permute_rope
from slm.gguf_import import read_gguf, unpermute_rope
from slm.load import load_model
from slm.weights import read_config, read_hf_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox 0123456789 éèà 🙂", "  spaces\tand\n\nlines "]


def _reader(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@torch.inference_mode()
def _greedy(model, prompt, n):
    from slm.generate import Stop, generate

    return generate(model, prompt, n, stop=Stop()).tokens


def _check_against_transformers(model_dir, gguf_path, n_new: int, slm_atol: float | None = 1e-4):
    """transformers loads the GGUF on its own: the same logits (1e-4) as transformers on the source
    model directory, the same tokenisation and the same greedy tokens as slm; with `slm_atol`, also
    slm's logits within it (on SmolLM2 the two engines' fp32 arithmetic alone differs by ~1e-4:
    tests/test_real_model.py)."""
    transformers = pytest.importorskip("transformers")
    from slm.tokenizer import Tokenizer

    load = transformers.AutoModelForCausalLM.from_pretrained
    hf = load(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    hf_dir = load(str(model_dir), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours, tok = load_model(model_dir), Tokenizer.load(model_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids, text
        x = torch.tensor([ids])
        with torch.inference_mode():
            theirs = hf(x).logits
            assert (theirs - hf_dir(x).logits).abs().max().item() <= 1e-4, text
            if slm_atol is not None:
                assert (ours(x) - theirs).abs().max().item() <= slm_atol, text
            greedy = hf.generate(x, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert _greedy(ours, ids, n_new) == greedy[0, len(ids):].tolist(), text


def test_permutation_is_the_inverse_of_the_import():
    w = torch.randn(6 * 8, 5)
    for heads in (6, 3, 2):
        assert torch.equal(unpermute_rope(permute_rope(w, heads), heads), w)
        assert not torch.equal(permute_rope(w, heads), w)


def test_tiny_f32_loads_in_transformers_and_reimports_exactly(tmp_path, tiny_model_dir):
    out = tmp_path / "gguf" / "tiny.gguf"
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--out", str(out)]) == 0
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left beside it
    reader, tensors = _reader(out)
    config = read_config(tiny_model_dir)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.attention.head_count_kv") == config.n_kv_heads == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt2"
    assert "output.weight" in tensors  # the tiny config does not tie its embeddings
    _check_against_transformers(tiny_model_dir, out, n_new=12)

    # slm import brings back every tensor bit for bit, and the config
    back = tmp_path / "back"
    assert main(["import", str(out), "--out", str(back)]) == 0
    assert read_config(back).replace(name=config.name) == config  # all but the registry name
    a, b = read_hf_state_dict(tiny_model_dir), read_hf_state_dict(back)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tied_embeddings_write_no_output_weight(tmp_path, tokenizer_dir):
    model_dir = make_model_dir(tmp_path / "tied", tokenizer_dir, seed=3, tie_embeddings=True)
    out = export_gguf(model_dir, tmp_path / "tied.gguf")
    _, tensors = _reader(out)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    config, hf, _ = read_gguf(out)
    assert config.tie_embeddings
    src = read_hf_state_dict(model_dir)
    for k, v in hf.items():
        assert torch.equal(v, src[k]), k
    _check_against_transformers(model_dir, out, n_new=8)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_lower_precision_is_gguf_quantiser_exactly(tmp_path, tiny_model_dir, dtype):
    """Each tensor is stored as gguf's own encoder writes it (the import dequantises it back to the
    value llama.cpp computes with); norms stay F32; q4_0 keeps the embeddings/lm_head in Q8_0."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    out = export_gguf(tiny_model_dir, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    _, tensors = _reader(out)
    config, back, _ = read_gguf(out)
    src = read_hf_state_dict(tiny_model_dir)
    for name, t in tensors.items():
        if t.data.ndim == 1 or name.endswith("norm.weight"):
            assert t.tensor_type == Q.F32, name
    layer_type = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == layer_type
    assert tensors["token_embd.weight"].tensor_type == (Q.F16 if dtype == "f16" else Q.Q8_0)
    for hf_name, gguf_name, heads in (("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", config.n_kv_heads),
                                      ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", None),
                                      ("lm_head.weight", "output.weight", None)):
        w = src[hf_name].float()
        w = permute_rope(w, heads) if heads else w
        qtype = tensors[gguf_name].tensor_type
        if qtype == Q.F16:
            want = w.half().float()
        else:
            want = torch.from_numpy(dequantize(quantize(w.numpy(), qtype), qtype).reshape(w.shape).copy())
        want = unpermute_rope(want, heads) if heads else want
        assert torch.equal(back[hf_name], want), (dtype, hf_name)


def test_q4_0_file_loads_in_transformers_as_slm_imports_it(tmp_path, tiny_model_dir):
    """The quantised file means the same to transformers as to slm's import (the weights llama.cpp runs)."""
    transformers = pytest.importorskip("transformers")
    out = export_gguf(tiny_model_dir, tmp_path / "q4.gguf", dtype="q4_0")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    assert main(["import", str(out), "--out", str(tmp_path / "back")]) == 0
    ours = load_model(tmp_path / "back")
    x = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        a, b, fp32 = ours(x), hf.eval()(x).logits, load_model(tiny_model_dir)(x)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - fp32).abs().max().item() > 1e-3  # and it is quantised


def test_sentencepiece_tokenizer_model_is_written_as_llama(tmp_path):
    """A model trained with slm's LLaMA-2-style SentencePiece tokenizer: pieces, scores and types as
    llama.cpp's converter writes them; the re-imported tokenizer encodes every text the same."""
    import sentencepiece as spm

    from slm.tokenizer import Tokenizer

    tok_dir = train_tiny_tokenizer(tmp_path / "tok")
    model_dir = make_model_dir(tmp_path / "m", tok_dir, seed=1)
    out = export_gguf(model_dir, tmp_path / "spm.gguf")
    reader, _ = _reader(out)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens")[: sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    scores = _field(reader, "tokenizer.ggml.scores")
    assert np.allclose(scores[: sp.vocab_size()], [sp.GetScore(i) for i in range(sp.vocab_size())])
    assert _field(reader, "tokenizer.ggml.token_type")[3] == 6  # <0x00>: a byte piece
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    back = tmp_path / "back"
    assert main(["import", str(out), "--out", str(back)]) == 0
    ours, theirs = Tokenizer.load(model_dir), Tokenizer.load(back)
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text), text


_LLAMA_VOCAB = llama2_vocab_gguf()


@pytest.mark.skipif(_LLAMA_VOCAB is None, reason="LLaMA-2 vocabulary not fetched: run python scripts/fetch_llama2_vocab.py")
def test_llama2_vocabulary_from_tokenizer_json_round_trips(tmp_path):
    """A SentencePiece vocabulary held only as tokenizer.json (what `slm import` of a LLaMA GGUF
    writes): exported with scores from the merge order, it comes back tokenising as llama.cpp's
    reference tokenisations say, with llama.cpp's own pieces and types."""
    from slm.gguf_import import read_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    read_tokenizer(_LLAMA_VOCAB).save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    model_dir = make_model_dir(tmp_path / "m", tok_dir, vocab_size=32000)
    out = export_gguf(model_dir, tmp_path / "llama2.gguf")
    reader, _ = _reader(out)
    ref, _ = _reader(_LLAMA_VOCAB)
    assert _field(reader, "tokenizer.ggml.tokens") == _field(ref, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.token_type") == _field(ref, "tokenizer.ggml.token_type")
    tok = read_tokenizer(out)
    texts = open(str(_LLAMA_VOCAB) + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    expected = open(str(_LLAMA_VOCAB) + ".out", encoding="utf-8").read().split("\n")
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == [int(i) for i in ids.split()], text


def test_bad_input_gives_one_line_errors(tmp_path, tiny_model_dir, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--dtype", "q4_0", "--out",
                 str(tmp_path / "x.gguf")]) == 0
    err = capsys.readouterr().err
    assert err.count("slm: error:") == 1 and "nope" in err
    with pytest.raises(SlmError, match="--dtype"):
        export_gguf(tiny_model_dir, tmp_path / "y.gguf", dtype="q2_k")
    # a tokenizer whose pre-tokenizer llama.cpp does not have: refused before anything is written
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    bad = make_model_dir(tmp_path / "badtok", None, vocab_size=320)
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SlmError, match="pre-tokenizer"):
        export_gguf(bad, tmp_path / "z.gguf")
    small = make_model_dir(tmp_path / "small", None, vocab_size=256)  # fewer rows than the tokenizer has ids
    (small / "tokenizer.json").write_text((tiny_model_dir / "tokenizer.json").read_text())
    with pytest.raises(SlmError, match="beyond the model's vocabulary"):
        export_gguf(small, tmp_path / "z.gguf")
    assert not any(p.name.startswith(".z.gguf") or p.name == "z.gguf" for p in tmp_path.iterdir())


# --- the real SmolLM2 ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_f32_export_matches_transformers_and_reimports_exactly(tmp_path):
    from slm.assets import smollm2_gguf

    try:
        src = smollm2_gguf()
    except SlmError as e:
        pytest.skip(str(e))
    from slm.gguf_import import cached_import

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model_dir = cached_import(src)
    out = export_gguf(model_dir, tmp_path / "smollm2.gguf")
    reader, tensors = _reader(out)
    assert "output.weight" not in tensors  # tied
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert _field(reader, "tokenizer.chat_template") == _field(_reader(src)[0], "tokenizer.chat_template")
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    _check_against_transformers(model_dir, out, n_new=16, slm_atol=None)
    _, back, _ = read_gguf(out)
    ref = read_hf_state_dict(model_dir)
    assert back.keys() == ref.keys()
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
