"""Every source kind round-trips through `prepare` (fixtures in the official formats), and every
kind of bad input is skipped, counted and named, or fatal with --strict."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from _data_common import expected_stream, make_docs, prepare_dir, read_stream, train_tiny_tokenizer, write_text_files

from slm.atomic import TMP_TAG
from slm.data import sources
from slm.data.sources import parse_source, strip_gutenberg
from slm.errors import SlmError
from slm.tokenizer import Tokenizer

W = 9  # seq_len 8 + 1


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def check_stream(out, source, tok, docs, manifest):
    """The source's windows are exactly the documents' tokens (+EOS each), cut into windows of W."""
    got = read_stream(out, source)
    want = expected_stream(tok, docs)
    assert len(got) == len(want) // W * W and got == want[: len(got)]
    (src,) = [s for s in manifest["sources"] if s["name"] == source]
    train = src["splits"]["train"]
    assert train["documents"] == len(docs) == src["documents"]
    assert train["tokens"] == len(want) and train["dropped_tail_tokens"] == len(want) % W
    return src


def jsonl_rows(docs, sets=None):
    sets = sets or ["RedPajamaC4"] * len(docs)
    return "".join(json.dumps({"text": d, "meta": {"redpajama_set_name": s}}) + "\n" for d, s in zip(docs, sets))


def test_slimpajama_jsonl_and_multi_frame_zst(tmp_path, tok, tok_dir):
    docs = make_docs(40, seed=3)
    sets = ["RedPajamaBook" if i % 5 == 0 else "RedPajamaC4" for i in range(40)]
    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "a.jsonl").write_text(jsonl_rows(docs[:20], sets[:20]))
    cctx = zstandard.ZstdCompressor()
    frames = [cctx.compress(jsonl_rows(docs[20:30], sets[20:30]).encode()), cctx.compress(jsonl_rows(docs[30:], sets[30:]).encode())]
    (folder / "b.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as streaming writers produce
    (folder / "ignored.txt").write_text("not a slimpajama file")
    kept = [d for d, s in zip(docs, sets) if s != "RedPajamaBook"]
    m = prepare_dir(tmp_path / "out", [f"slimpajama:{folder}"], tok_dir)
    src = check_stream(tmp_path / "out", "slimpajama", tok, kept, m)
    assert src["skipped"]["by_reason"] == {"RedPajamaBook": 8}
    m = prepare_dir(tmp_path / "out2", [f"slimpajama:{folder}"], tok_dir, read={"keep_books": True})
    check_stream(tmp_path / "out2", "slimpajama", tok, docs, m)


def test_jsonl_byte_ranges_give_each_line_exactly_once(tmp_path, tok, tok_dir, monkeypatch):
    docs = make_docs(60, seed=4)
    (tmp_path / "big.jsonl").write_text(jsonl_rows(docs))
    monkeypatch.setattr(sources, "_UNIT_BYTES", 257)  # many units, boundaries inside lines
    m = prepare_dir(tmp_path / "out", [f"slimpajama:{tmp_path / 'big.jsonl'}"], tok_dir)
    check_stream(tmp_path / "out", "slimpajama", tok, docs, m)


BOOK = "It was a dark and stormy night.\n\nThe end of chapter one.\n"
HEADER = (
    "The Project Gutenberg eBook of A Test Book\n\nThis eBook is for the use of anyone anywhere...\n\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***\n"
)
FOOTER = "\n*** END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***\n\nSection 1. General Terms of Use\nlicence...\n"


def test_gutenberg_header_and_footer_are_stripped(tmp_path, tok, tok_dir):
    assert strip_gutenberg(HEADER + "\n" + BOOK + FOOTER) == BOOK
    assert strip_gutenberg(HEADER.replace("THE PROJECT", "THIS PROJECT") + BOOK) == BOOK
    assert strip_gutenberg(BOOK) == BOOK  # no markers: the whole text
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "1.txt").write_text(HEADER + BOOK + FOOTER)
    (folder / "2.txt").write_text("\ufeff" + HEADER + "Second book.\n" + FOOTER)  # with a BOM
    m = prepare_dir(tmp_path / "out", [f"gutenberg:{folder}"], tok_dir)
    check_stream(tmp_path / "out", "gutenberg", tok, [BOOK, "Second book.\n"], m)


def test_parquet_text_and_content_columns_by_row_group(tmp_path, tok, tok_dir):
    docs = make_docs(30, seed=5)
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": docs[:15], "id": list(range(15))}), folder / "a.parquet", row_group_size=4)
    # StarCoder data: the code is in `content`; a null row is an empty document.
    rows = docs[15:22] + [None] + docs[22:]
    pq.write_table(pa.table({"content": rows}), folder / "b.parquet", row_group_size=3)
    m = prepare_dir(tmp_path / "out", [f"parquet:{folder}"], tok_dir)
    src = check_stream(tmp_path / "out", "parquet", tok, docs, m)
    assert src["skipped"]["documents"] == [{"where": f"{folder / 'b.parquet'}:row 7", "reason": "empty document"}]


def test_code_folder_by_extension_and_text_files(tmp_path, tok, tok_dir):
    docs = make_docs(12, seed=6)
    code = tmp_path / "code"
    write_text_files(code / "pkg", docs[:5], suffix=".py")
    write_text_files(code / "pkg", docs[5:7], suffix=".md")  # not code: ignored
    write_text_files(code / "site-packages", docs[7:9], suffix=".py")  # excluded below
    write_text_files(code / "lib", docs[9:], suffix=".c")
    m = prepare_dir(
        tmp_path / "out", [f"code:{code}", f"text:{code / 'pkg'}:0.5"], tok_dir,
        read={"code_ext": (".py", ".c"), "text_ext": (".md",), "exclude": ("site-packages",)},
    )  # fmt: skip
    check_stream(tmp_path / "out", "code", tok, docs[9:] + docs[:5], m)  # sorted: lib/ before pkg/
    check_stream(tmp_path / "out", "text", tok, docs[5:7], m)
    assert [s["weight"] for s in m["sources"]] == [1.0, 0.5]


def test_source_spec_parsing():
    s = parse_source("code:/a/b:0.3")
    assert (s.kind, str(s.path), s.weight) == ("code", "/a/b", 0.3)
    assert str(parse_source("text:/x:y/z").path) == "/x:y/z"
    for bad in ("nope:/x", "code", "code:", "code:/x:-1"):
        with pytest.raises(SlmError):
            parse_source(bad)


# --- bad input ------------------------------------------------------------------------------


def bad_corpus(tmp_path, docs):
    """A slimpajama folder and a text folder with one of each kind of bad input."""
    sp = tmp_path / "sp"
    sp.mkdir()
    lines = jsonl_rows(docs[:6]).splitlines(keepends=True)
    lines.insert(2, '{"text": "unterminated\n')  # malformed JSON (line 3)
    lines.insert(4, json.dumps({"text": "   \n"}) + "\n")  # empty document (line 5)
    lines.insert(5, json.dumps({"meta": {}}) + "\n")  # no text field (line 6)
    raw = "".join(lines).encode()
    raw += b'{"text": "caf\xe9 latin-1"}\n'  # not UTF-8 (line 10)
    raw += jsonl_rows(docs[6:8]).encode()
    (sp / "a.jsonl").write_bytes(raw)
    cctx = zstandard.ZstdCompressor()
    frames = b"".join(cctx.compress(jsonl_rows(docs[i : i + 4]).encode()) for i in range(8, 40, 4))
    (sp / "b.jsonl.zst").write_bytes(frames[: len(frames) * 2 // 3])  # truncated download
    txt = tmp_path / "txt"
    write_text_files(txt, docs[40:43])
    (txt / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))
    (txt / "empty.txt").write_text("\n\n")
    (txt / "broken.txt").symlink_to(tmp_path / "missing-target")  # cannot be read
    return sp, txt


def test_bad_input_is_skipped_counted_and_named(tmp_path, tok, tok_dir, capfd):
    docs = make_docs(43, seed=7)
    sp, txt = bad_corpus(tmp_path, docs)
    m = prepare_dir(tmp_path / "out", [f"slimpajama:{sp}", f"text:{txt}"], tok_dir, show_skipped=True)
    err = capfd.readouterr().err
    by_name = {s["name"]: s for s in m["sources"]}
    spj, text = by_name["slimpajama"], by_name["text"]
    assert spj["skipped"]["by_reason"] == {
        "empty document": 1, "malformed JSON": 1, "no string field 'text'": 1,
        "not UTF-8": 1, "truncated zstd stream": 1,
    }  # fmt: skip
    named = {d["where"]: d["reason"] for d in spj["skipped"]["documents"]}
    assert named[f"{sp / 'a.jsonl'}@{len(''.join(jsonl_rows(docs[:2])))}"].startswith("malformed JSON")
    (trunc_where,) = [w for w, r in named.items() if r.startswith("truncated")]
    assert trunc_where.startswith(f"{sp / 'b.jsonl.zst'}:")
    # Everything readable is kept: the good lines, and the zst lines before the cut.
    kept_zst = int(trunc_where.rsplit(":", 1)[1]) - 1
    assert 0 < kept_zst < 32
    check_stream(tmp_path / "out", "slimpajama", tok, docs[:8] + docs[8 : 8 + kept_zst], m)
    assert text["skipped"]["by_reason"] == {"empty document": 1, "not UTF-8": 1, "unreadable file": 1}
    check_stream(tmp_path / "out", "text", tok, docs[40:43], m)
    for where in list(named) + [str(txt / "latin1.txt"), str(txt / "empty.txt"), str(txt / "broken.txt")]:
        assert where in err  # and named on stderr
    assert m["totals"]["skipped"] == 8


BAD_FILES = {"a.jsonl", "b.jsonl.zst", "latin1.txt", "empty.txt", "broken.txt"}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_strict_makes_the_first_bad_input_fatal(tmp_path, tok_dir, case):
    docs = make_docs(43, seed=7)
    sp, txt = bad_corpus(tmp_path, docs)
    (sp / "z.jsonl").write_text(jsonl_rows(docs[:1]))  # a good file, so both sources stay non-empty
    for folder in (sp, txt):  # keep only this case's bad file: the error must name it
        for f in folder.iterdir():
            if f.name in BAD_FILES - {case}:
                f.unlink()
    with pytest.raises(SlmError, match=rf"{case}.*\(--strict\)"):
        prepare_dir(tmp_path / "out", [f"slimpajama:{sp}", f"text:{txt}"], tok_dir, strict=True)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob(f"*{TMP_TAG}*"))
    prepare_dir(tmp_path / "out", [f"slimpajama:{sp}", f"text:{txt}"], tok_dir)  # lenient: finishes


def test_missing_source_is_an_error(tmp_path, tok_dir):
    with pytest.raises(SlmError, match="no such file"):
        prepare_dir(tmp_path / "out", [f"text:{tmp_path / 'nope'}"], tok_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmError, match="no files ending in .py"):
        prepare_dir(tmp_path / "out", [f"code:{tmp_path / 'empty'}"], tok_dir)


def test_text_the_tokenizer_rejects_is_skipped_not_fatal(tmp_path, tok, tok_dir):
    docs = make_docs(3, seed=8)
    rows = jsonl_rows(docs[:1]) + '{"text": "lone surrogate \\ud800 here"}\n' + jsonl_rows(docs[1:])
    (tmp_path / "s.jsonl").write_text(rows)
    m = prepare_dir(tmp_path / "out", [f"slimpajama:{tmp_path / 's.jsonl'}"], tok_dir)
    src = check_stream(tmp_path / "out", "slimpajama", tok, docs, m)
    assert src["skipped"]["by_reason"] == {"cannot be tokenized": 1}
