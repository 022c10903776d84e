"""Readers for each source kind: plan a source into work units, read a unit into documents.

A source is `KIND:PATH[:WEIGHT]`. Kinds:

* `slimpajama`: `.jsonl` / `.jsonl.zst` files (or folders of them), one JSON object per
  line with the document in `text`; rows whose `meta.redpajama_set_name` is
  `RedPajamaBook` are dropped unless `keep_books` (AMD-135M's filter);
* `gutenberg`: plain-text books; the Project Gutenberg header and licence footer
  (outside the `*** START OF ... ***` / `*** END OF ... ***` lines) are stripped;
* `parquet`: `.parquet` files, the `text` or `content` column (StarCoder data);
* `code`: a folder of source files with the chosen extensions, one document per file;
* `text`: plain text files, one document per file.

Reading never stops at bad input: each bad document (or unreadable file) becomes a
`Skip` with a place and a reason, and the reader goes on. Work units are small and
independent (a group of files, a byte range of a .jsonl, one .zst file, one parquet
row group) so that worker processes can read and tokenize them in parallel while
memory stays bounded.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slm.errors import SlmError

KINDS = ("slimpajama", "gutenberg", "parquet", "code", "text")
_UNIT_BYTES = 1 << 18  # input bytes per work unit: small, so that workers finish together and memory stays bounded


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: Path
    weight: float = 1.0
    name: str = ""


@dataclass(frozen=True)
class ReadOptions:
    keep_books: bool = False  # slimpajama: keep RedPajamaBook rows
    code_ext: tuple[str, ...] = (".py",)
    text_ext: tuple[str, ...] = (".txt",)
    exclude: tuple[str, ...] = ()  # directory names not descended into (e.g. site-packages)
    max_doc_bytes: int = 1 << 25  # a longer document (file, JSON line, row) is skipped: memory stays bounded


@dataclass(frozen=True)
class WorkUnit:
    source: int  # index of the source in the prepare call
    kind: str
    paths: tuple[str, ...]
    start: int = 0  # .jsonl: first byte; parquet: row group
    stop: int = -1  # .jsonl: end byte (exclusive), -1 = end of file
    size: int = 0  # input bytes on disk, for progress


@dataclass
class Doc:
    text: str
    where: str


@dataclass
class Skip:
    where: str
    reason: str
    bad: bool = True  # False for documents dropped on purpose (the book filter)


@dataclass
class _Files:
    paths: list[Path] = field(default_factory=list)
    unreadable: list[Skip] = field(default_factory=list)


def parse_source(spec: str) -> SourceSpec:
    """`KIND:PATH[:WEIGHT]` -> SourceSpec (name filled in later by `name_sources`)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SlmError(f"--source {spec!r}: expected KIND:PATH[:WEIGHT] with KIND one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise SlmError(f"--source {spec!r}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    path, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass  # a ':' inside the path
    if not weight > 0:
        raise SlmError(f"--source {spec!r}: weight must be > 0, got {weight}")
    return SourceSpec(kind, Path(path), weight)


def name_sources(specs: list[SourceSpec]) -> list[SourceSpec]:
    """Name each source by its kind, `kind_2`, `kind_3`... when a kind repeats."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        seen[s.kind] = seen.get(s.kind, 0) + 1
        name = s.kind if seen[s.kind] == 1 else f"{s.kind}_{seen[s.kind]}"
        out.append(SourceSpec(s.kind, s.path, s.weight, name))
    return out


def _suffixes(kind: str, opts: ReadOptions) -> tuple[str, ...]:
    return {
        "slimpajama": (".jsonl", ".jsonl.zst"),
        "gutenberg": (".txt",),
        "parquet": (".parquet",),
        "code": opts.code_ext,
        "text": opts.text_ext,
    }[kind]


def list_files(spec: SourceSpec, opts: ReadOptions) -> _Files:
    """The source's files in a deterministic (sorted) order; a file given directly is always used."""
    path = spec.path
    if path.is_file():
        return _Files([path])
    if path.exists() and not path.is_dir():
        raise SlmError(f"{spec.kind} source {path}: {_not_regular(path.stat().st_mode)}")
    if not path.is_dir():
        raise SlmError(f"{spec.kind} source {path}: no such file or directory")
    suffixes = _suffixes(spec.kind, opts)
    found = _Files()
    skip_dirs = set(opts.exclude) | {"__pycache__"}

    def onerror(e: OSError) -> None:
        found.unreadable.append(Skip(str(e.filename), f"unreadable directory ({e.strerror})"))

    for root, dirs, files in os.walk(path, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
        for f in sorted(files):
            if f.endswith(suffixes):
                found.paths.append(Path(root) / f)
    if not found.paths and not found.unreadable:
        raise SlmError(f"{spec.kind} source {path}: no files ending in {', '.join(suffixes)}")
    return found


def plan_units(index: int, spec: SourceSpec, opts: ReadOptions) -> Iterator[WorkUnit | Skip]:
    """Cut a source into work units, in a fixed order; unreadable files come out as Skips."""
    files = list_files(spec, opts)
    yield from files.unreadable
    group: list[str] = []
    group_bytes = 0
    for path in files.paths:
        try:
            st = path.stat()  # follows a symlink: its target must be a regular file too
        except OSError as e:
            yield Skip(str(path), f"unreadable file ({e.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever, /dev/zero never end
            yield Skip(str(path), _not_regular(st.st_mode))
            continue
        size = st.st_size
        if size > opts.max_doc_bytes and spec.kind not in ("slimpajama", "parquet"):
            yield Skip(str(path), _too_large(size, opts))
            continue
        if spec.kind == "parquet":
            yield from _parquet_units(index, path, size)
        elif spec.kind == "slimpajama" and path.name.endswith(".zst"):
            yield WorkUnit(index, spec.kind, (str(path),), size=size)  # a zstd stream cannot be split
        elif spec.kind == "slimpajama":
            for start in range(0, max(size, 1), _UNIT_BYTES):
                stop = min(start + _UNIT_BYTES, size)
                yield WorkUnit(index, spec.kind, (str(path),), start, stop, stop - start)
        else:  # one document per file: batch small files into one unit
            group.append(str(path))
            group_bytes += size
            if group_bytes >= _UNIT_BYTES:
                yield WorkUnit(index, spec.kind, tuple(group), size=group_bytes)
                group, group_bytes = [], 0
    if group:
        yield WorkUnit(index, spec.kind, tuple(group), size=group_bytes)


def _not_regular(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))
    return f"not a regular file ({next((name for test, name in kinds if test(mode)), 'special file')})"


def _too_large(size: int, opts: ReadOptions) -> str:
    return f"document too large ({size:,} bytes > --max-doc-bytes {opts.max_doc_bytes:,})"


def _parquet_units(index: int, path: Path, size: int) -> Iterator[WorkUnit | Skip]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/... for unreadable files
        yield Skip(str(path), f"unreadable parquet file ({_first_line(e)})")
        return
    n = meta.num_row_groups
    for g in range(n):
        yield WorkUnit(index, "parquet", (str(path),), g, g + 1, size // max(n, 1))


# --- reading ----------------------------------------------------------------------------


def read_unit(unit: WorkUnit, opts: ReadOptions) -> Iterator[Doc | Skip]:
    """Every document of a unit, in order, and a Skip for every one that cannot be used."""
    if unit.kind == "slimpajama":
        yield from _read_jsonl(unit, opts)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit, opts)
    else:
        for path in unit.paths:
            yield _read_file_doc(path, unit.kind, opts)


def _read_file_doc(path: str, kind: str, opts: ReadOptions) -> Doc | Skip:
    try:
        # O_NONBLOCK: a file swapped for a FIFO since planning must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                return Skip(path, _not_regular(mode))
            raw = f.read(opts.max_doc_bytes + 1)  # bounded even if the file grew since planning
    except OSError as e:
        return Skip(path, f"unreadable file ({e.strerror})")
    if len(raw) > opts.max_doc_bytes:
        return Skip(path, _too_large(len(raw), opts))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Skip(path, f"not UTF-8 (byte {e.start})")
    text = text.removeprefix("\ufeff")
    if kind == "gutenberg":
        text = strip_gutenberg(text)
    if not text.strip():
        return Skip(path, "empty document")
    return Doc(text, path)


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The book between the Project Gutenberg START and END lines (all of it when they are absent)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\r\n") + "\n" if (start or end) else text


def _jsonl_doc(line: bytes, where: str, opts: ReadOptions) -> Doc | Skip | None:
    if not line.strip():
        return None  # blank lines separate nothing in JSON Lines
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Skip(where, f"not UTF-8 (byte {e.start} of the line)")
    except ValueError as e:
        return Skip(where, f"malformed JSON ({e.msg})")
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return Skip(where, "no string field 'text'")
    meta = obj.get("meta")
    if not opts.keep_books and isinstance(meta, dict) and meta.get("redpajama_set_name") == "RedPajamaBook":
        return Skip(where, "RedPajamaBook (filtered)", bad=False)
    if not text.strip():
        return Skip(where, "empty document")
    return Doc(text, where)


def _read_jsonl(unit: WorkUnit, opts: ReadOptions) -> Iterator[Doc | Skip]:
    path = unit.paths[0]
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Skip(path, f"unreadable file ({e.strerror})")
        return
    with f:
        if path.endswith(".zst"):
            lineno = 0
            try:
                for line in _zstd_lines(f, opts.max_doc_bytes):
                    lineno += 1
                    if line is None:
                        yield Skip(f"{path}:{lineno}",
                                   f"document too large (line over --max-doc-bytes {opts.max_doc_bytes:,})")
                        continue
                    item = _jsonl_doc(line, f"{path}:{lineno}", opts)
                    if item is not None:
                        yield item
            except _ZstdBroken as e:
                yield Skip(f"{path}:{lineno + 1}", f"{e} (rest of the file lost)")
            return
        # A byte range [start, stop): it owns the lines that start inside it.
        if unit.start > 0:
            f.seek(unit.start - 1)
            f.readline()  # finish the line that straddles `start` (owned by the previous unit)
        stop = unit.stop if unit.stop >= 0 else float("inf")
        while (pos := f.tell()) < stop:
            line = f.readline(opts.max_doc_bytes + 1)
            if not line:
                break
            if len(line) > opts.max_doc_bytes and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the over-long line without holding it
                yield Skip(f"{path}@{pos}", f"document too large (line over --max-doc-bytes {opts.max_doc_bytes:,})")
                continue
            item = _jsonl_doc(line, f"{path}@{pos}", opts)
            if item is not None:
                yield item


class _ZstdBroken(Exception):
    pass


def _zstd_lines(f, max_bytes: int) -> Iterator[bytes | None]:
    """Lines of a (multi-frame) zstd file; raises _ZstdBroken if it is truncated or corrupt.
    A line longer than `max_bytes` comes out as None (and is never held whole).

    `zstandard`'s stream_reader returns truncated input silently, so frames are
    decoded with decompressobj, which tells whether a frame really ended.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    in_frame = False
    pending = b""
    too_long = False  # inside a line already reported as too long
    while chunk := f.read(1 << 20):
        while chunk:
            try:
                out = obj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise _ZstdBroken(f"corrupt zstd data ({e})") from None
            in_frame = not obj.eof
            if obj.eof:  # the next frame starts in unused_data
                chunk = obj.unused_data
                obj = dctx.decompressobj()
            else:
                chunk = b""
            if out:
                lines = (pending + out).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if too_long:
                        too_long = False  # the end of the long line: drop it
                    else:
                        yield None if len(line) > max_bytes else line
                if len(pending) > max_bytes:
                    if not too_long:
                        yield None
                    too_long, pending = True, b""
    if in_frame:
        raise _ZstdBroken("truncated zstd stream")
    if pending and not too_long:
        yield None if len(pending) > max_bytes else pending


def _read_parquet(unit: WorkUnit, opts: ReadOptions) -> Iterator[Doc | Skip]:
    import pyarrow.parquet as pq

    path, group = unit.paths[0], unit.start
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        column = "text" if "text" in names else "content" if "content" in names else None
        if column is None:
            yield Skip(path, f"no column 'text' or 'content' (columns: {', '.join(names)})")
            return
        first_row = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
    except Exception as e:  # pyarrow's many exception types for broken files
        yield Skip(f"{path}:row group {group}", f"unreadable parquet data ({_first_line(e)})")
        return
    for i, text in enumerate(values):
        where = f"{path}:row {first_row + i}"
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Skip(where, f"not UTF-8 (byte {e.start})")
                continue
        if not text or not text.strip():
            yield Skip(where, "empty document")
            continue
        if len(text) > opts.max_doc_bytes:  # characters: at least as many bytes
            yield Skip(where, f"document too large ({len(text):,} characters > --max-doc-bytes {opts.max_doc_bytes:,})")
            continue
        yield Doc(text, where)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
