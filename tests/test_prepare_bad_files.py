"""`slm data prepare` on files that are not documents (issue 13 items 6 and 10): a FIFO or a
device never blocks or exhausts memory, an over-long document is skipped and counted, skipped
files are summarised in one line unless --show-skipped, and a failed start leaves no --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import zstandard
from _data_common import make_docs, prepare_dir, train_tiny_tokenizer, write_text_files

from slm.cli import main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def _code_folder(tmp_path):
    src = tmp_path / "src"
    write_text_files(src, make_docs(3, seed=1), suffix=".py")
    os.mkfifo(src / "x.py")  # reading it would block forever
    (src / "zero.py").symlink_to("/dev/zero")  # reading it would never end
    return src


def test_fifo_and_device_are_skipped_and_named(tmp_path, tok_dir):
    src = _code_folder(tmp_path)
    # In a subprocess with a timeout: the bug this guards against is a hang.
    script = (f"import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r}); "
              f"from _data_common import prepare_dir; from pathlib import Path; import json; "
              f"m = prepare_dir(Path({str(tmp_path / 'out')!r}), ['code:{src}'], Path({str(tok_dir)!r})); "
              f"print(json.dumps(m['sources'][0]['skipped']))")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    skipped = json.loads(p.stdout)
    named = {d["where"]: d["reason"] for d in skipped["documents"]}
    assert named == {str(src / "x.py"): "not a regular file (FIFO)",
                     str(src / "zero.py"): "not a regular file (character device)"}
    assert skipped["by_reason"] == {"not a regular file": 2}


def test_summary_is_one_line_unless_show_skipped(tmp_path, tok_dir, capsys):
    src = _code_folder(tmp_path)
    (src / "empty.py").write_text("\n")
    base = ["data", "prepare", "--source", f"code:{src}", "--tokenizer", str(tok_dir), "--seq-len", "8", "--json"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["slm: code: skipped 3: empty document 1, not a regular file 2; names in manifest.json "
                   "(--show-skipped names them)"]
    assert main([*base, "--out", str(tmp_path / "b"), "--show-skipped"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"slm: skipped {src / 'x.py'}: not a regular file (FIFO)" in err
    assert f"slm: skipped {src / 'zero.py'}: not a regular file (character device)" in err
    assert err[-1] == "slm: code: skipped 3: empty document 1, not a regular file 2"


def test_document_size_is_bounded(tmp_path, tok_dir):
    docs = make_docs(4, seed=2)
    txt = tmp_path / "txt"
    write_text_files(txt, docs[:2])
    (txt / "big.txt").write_text("word " * 400)  # 2000 bytes
    sp = tmp_path / "sp"
    sp.mkdir()
    rows = [json.dumps({"text": d}) for d in docs[2:]] + [json.dumps({"text": "x" * 3000})]
    (sp / "a.jsonl").write_text("\n".join(rows[:1] + rows[2:] + rows[1:2]) + "\n")  # the long line in the middle
    (sp / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(rows) + "\n").encode()))
    m = prepare_dir(tmp_path / "out", [f"text:{txt}", f"slimpajama:{sp}"], tok_dir,
                    read={"max_doc_bytes": 1000})
    text, spj = m["sources"]
    assert text["skipped"]["by_reason"] == {"document too large": 1} and text["documents"] == 2
    assert text["skipped"]["documents"][0]["where"] == str(txt / "big.txt")
    assert spj["skipped"]["by_reason"] == {"document too large": 2} and spj["documents"] == 4
    # the lines after the long one are still read (the reader skipped exactly that line)
    assert {d["where"].split("/")[-1].split("@")[0].split(":")[0] for d in spj["skipped"]["documents"]} == {
        "a.jsonl", "b.jsonl.zst"}


def test_bad_prepare_leaves_no_out(tmp_path, tok_dir):
    assert main(["data", "prepare", "--source", f"text:{tmp_path / 'missing'}", "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    os.mkfifo(tmp_path / "fifo.txt")  # given directly, not in a folder
    assert main(["data", "prepare", "--source", f"text:{tmp_path / 'fifo.txt'}", "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
