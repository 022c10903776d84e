"""`prepare`: windows of seq_len + 1, EOS-terminated documents, worker-independent output,
a document-level deterministic split, safe interruption and re-runs, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _data_common import expected_stream, make_docs, prepare_dir, read_stream, train_tiny_tokenizer, write_text_files

from slm.atomic import TMP_TAG
from slm.cli import main
from slm.data import prepare as prepare_mod
from slm.data import sources
from slm.data.loader import PackedDataset
from slm.data.prepare import is_val
from slm.data.shards import ShardWriter, open_shard, read_header, token_dtype
from slm.errors import SlmError
from slm.tokenizer import Tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tok_dir = train_tiny_tokenizer(root / "tok")
    docs = make_docs(120, seed=9)
    write_text_files(root / "docs", docs)
    return root, tok_dir, docs


def files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}


def test_windows_are_seq_len_plus_one_of_eos_terminated_documents(corpus, tmp_path):
    root, tok_dir, docs = corpus
    tok = Tokenizer.load(tok_dir)
    m = prepare_dir(tmp_path / "out", [f"text:{root / 'docs'}"], tok_dir, seq_len=SEQ, val_fraction=0.25, shard_tokens=100)
    assert m["seq_len"] == SEQ and m["window"] == SEQ + 1 and m["dtype"] == "uint16"
    for split in ("train", "val"):
        split_docs = [d for d in docs if is_val(d, 0.25) == (split == "val")]
        stream = read_stream(tmp_path / "out", "text", split)
        want = expected_stream(tok, split_docs)
        assert len(stream) % (SEQ + 1) == 0 and stream == want[: len(stream)]
        assert len(want) - len(stream) == m["sources"][0]["splits"][split]["dropped_tail_tokens"] < SEQ + 1
        assert want.count(tok.eos_id) == len(split_docs) and tok.bos_id not in want
        for sh in m["sources"][0]["splits"][split]["shards"]:
            assert sh["tokens"] == sh["windows"] * (SEQ + 1) <= 100  # whole windows, shard limit kept
    ds = PackedDataset(tmp_path / "out", "train")
    assert all(len(ds[i]) == SEQ + 1 for i in range(len(ds)))


def test_split_is_by_document_and_deterministic(corpus):
    _, _, docs = corpus
    val = [d for d in docs if is_val(d, 0.25)]
    assert 0.1 < len(val) / len(docs) < 0.4
    assert val == [d for d in docs if is_val(d, 0.25)]
    assert not any(is_val(d, 0.0) for d in docs)
    assert set(val) <= {d for d in docs if is_val(d, 0.5)}  # growing the fraction only adds documents


def test_output_is_identical_for_any_number_of_workers(corpus, tmp_path, monkeypatch):
    root, tok_dir, _ = corpus

    monkeypatch.setattr(sources, "_UNIT_BYTES", 2000)  # many units, so 2 workers really interleave
    srcs = [f"text:{root / 'docs'}", f"code:{root / 'docs'}"]
    kw = dict(seq_len=SEQ, val_fraction=0.1, read={"code_ext": (".txt",)})
    m1 = prepare_dir(tmp_path / "w1", srcs, tok_dir, workers=1, **kw)
    m2 = prepare_dir(tmp_path / "w2", srcs, tok_dir, workers=2, **kw)
    assert files(tmp_path / "w1") == files(tmp_path / "w2") != {}
    for m in (m1, m2):
        m["totals"].pop("seconds")
    assert m1["sources"] == m2["sources"] and m1["totals"] == m2["totals"]


def test_interrupted_prepare_leaves_nothing_that_looks_complete(corpus, tmp_path, monkeypatch):
    root, tok_dir, _ = corpus
    out = tmp_path / "out"
    srcs = [f"text:{root / 'docs'}"]
    reference = tmp_path / "ref"
    prepare_dir(reference, srcs, tok_dir, seq_len=SEQ, shard_tokens=200)

    calls = {"n": 0}
    real_add = prepare_mod._Packer.add

    def add_then_die(self, tokens):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_add(self, tokens)

    monkeypatch.setattr(prepare_mod._Packer, "add", add_then_die)
    monkeypatch.setattr(sources, "_UNIT_BYTES", 3000)  # several units, so it dies mid-way
    with pytest.raises(KeyboardInterrupt):
        prepare_dir(out, srcs, tok_dir, seq_len=SEQ, shard_tokens=200)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and not list(out.glob(f"*{TMP_TAG}*"))
    assert list(out.glob("*.bin"))  # finished shards exist, but without a manifest nothing reads them
    for p in out.glob("*.bin"):
        read_header(p)  # each one whole
    with pytest.raises(SlmError, match="did not finish"):
        PackedDataset(out)
    prepare_dir(out, srcs, tok_dir, seq_len=SEQ, shard_tokens=200)  # the same command finishes the job
    assert files(out) == files(reference)


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(corpus, tmp_path):
    root, tok_dir, _ = corpus
    out = tmp_path / "out"
    srcs = [f"text:{root / 'docs'}"]
    m = prepare_dir(out, srcs, tok_dir, seq_len=SEQ)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_dir(out, srcs, tok_dir, seq_len=SEQ) == m
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(SlmError, match="--overwrite"):
        prepare_dir(out, srcs, tok_dir, seq_len=SEQ * 2)
    m2 = prepare_dir(out, srcs, tok_dir, seq_len=SEQ * 2, overwrite=True)
    assert m2["seq_len"] == SEQ * 2 and PackedDataset(out).seq_len == SEQ * 2
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(
        sh["file"] for sp in m2["sources"][0]["splits"].values() for sh in sp["shards"]
    )  # no stale shards of the first run


def test_manifest_records_tokenizer_and_settings(corpus, tmp_path):
    root, tok_dir, docs = corpus
    m = prepare_dir(tmp_path / "out", [f"text:{root / 'docs'}:2.5"], tok_dir, seq_len=SEQ)
    assert m["tokenizer"]["sha256"] == prepare_mod.file_sha256(Tokenizer.load(tok_dir).path)
    assert m["tokenizer"]["eos_id"] == 2 and m["tokenizer"]["vocab_size"] == 400
    src = m["sources"][0]
    assert src["weight"] == 2.5 and src["documents"] == len(docs) and src["skipped"]["count"] == 0
    assert PackedDataset(tmp_path / "out").default_weights == {"text": 2.5}


def test_shard_dtypes_and_header(tmp_path):
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokens = np.array([0, 1, 70000, 2**32 - 1], dtype=np.uint32)
    w = ShardWriter(tmp_path / "s.bin", token_dtype(100_000))
    w.write(tokens)
    assert list(tmp_path.glob(f".s.bin{TMP_TAG}*")) and not (tmp_path / "s.bin").exists()
    w.close()
    assert read_header(tmp_path / "s.bin") == (np.dtype("<u4"), 4)
    assert open_shard(tmp_path / "s.bin").tolist() == tokens.tolist()
    raw = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(raw[:8] + b"\x09" + raw[9:])
    with pytest.raises(SlmError, match="version 9"):
        read_header(tmp_path / "s.bin")


def test_cli_prepare_and_info(corpus, tmp_path, capsys):
    root, tok_dir, docs = corpus
    out = tmp_path / "out"
    code = main(["data", "prepare", "--source", f"text:{root / 'docs'}", "--tokenizer", str(tok_dir),
                 "--seq-len", str(SEQ), "--out", str(out), "--workers", "2", "--json"])  # fmt: skip
    assert code == 0
    totals = json.loads(capsys.readouterr().out)
    assert totals["documents"] == len(docs) and totals["train_windows"] + totals["val_windows"] > 0
    assert main(["data", "info", str(out)]) == 0
    assert "text" in capsys.readouterr().out
    assert main(["data", "prepare", "--source", "bogus:/x", "--tokenizer", str(tok_dir), "--out", str(out)]) == 2
    assert "unknown kind 'bogus'" in capsys.readouterr().err
