"""`slm data prepare`: raw sources -> tokenized, packed shards + manifest.json.

Pipeline: the main process plans each source into small work units (sources.py);
worker processes read and tokenize units (each document without BOS, ending with
EOS) and send back flat token arrays; the main process takes results in unit order
(so the output is byte-identical for any number of workers) and packs them.

Packing. Per source and split, the documents' tokens are concatenated in input order
and cut into non-overlapping windows of seq_len + 1 tokens (a training example is
window[:-1] -> window[1:]). The last, incomplete window of each source and split is
dropped and counted in the manifest (`dropped_tail_tokens`). Windows are written to
shards `<source>.<split>.<n>.bin` (shards.py) of at most `shard_tokens` tokens.

Train/validation split: per document, by a hash of its text (blake2b), so it is
deterministic, independent of order and workers, and held out at document level
(exact duplicates land on the same side).

Interruption: a shard is written under a temporary name and renamed when complete;
manifest.json is written last. A directory without manifest.json is unfinished (the
loader refuses it); re-running the same command deletes its leftover shards and
redoes the job. Re-running a finished job with the same settings does nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from slm.atomic import sweep_stale, write_json
from slm.data import skips
from slm.data.loader import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION
from slm.data.shards import ShardWriter, token_dtype
from slm.data.sources import Doc, ReadOptions, Skip, SourceSpec, WorkUnit, name_sources, plan_units, read_unit
from slm.errors import SlmError
from slm.paths import file_sha256
from slm.tokenizer import Tokenizer

SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+\.(train|val)\.\d{5}\.bin$")
_MAX_NAMED_SKIPS = 1000  # per source in the manifest; the counts by reason are always complete
_BATCH_CHARS = 1 << 20  # characters per tokenizer call inside a worker


@dataclass
class PrepareConfig:
    sources: list[SourceSpec]
    tokenizer: str
    out: Path
    seq_len: int = 2048
    workers: int = 1
    val_fraction: float = 0.005
    strict: bool = False
    shard_tokens: int = 1 << 28  # 512 MiB of uint16 per shard at most
    read: ReadOptions = field(default_factory=ReadOptions)
    overwrite: bool = False
    progress: bool = False
    show_skipped: bool = False  # name each skipped document on stderr (else one summary line per source)


@dataclass
class UnitResult:
    source: int
    tokens: dict[str, np.ndarray]  # split -> concatenated document tokens, each ending with EOS
    docs: dict[str, int]
    text_chars: int
    skips: list[Skip]


# --- worker side ---------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(tokenizer_path: str, read: ReadOptions, val_fraction: float) -> None:
    if _worker.get("key") == (tokenizer_path, read, val_fraction):
        return  # set up in the parent before the pool forked (see `_results`)
    # One tokenizer per process; its own threads would only fight the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.load(tokenizer_path)
    tok.parse_special_tokens(False)  # a document quoting "</s>" is text, not an EOS
    tok.threads = 1
    _worker.update(tok=tok, read=read, val_fraction=val_fraction, dtype=token_dtype(tok.vocab_size),
                   key=(tokenizer_path, read, val_fraction))


def is_val(text: str, val_fraction: float) -> bool:
    """The document-level split: the first 8 bytes of blake2b(text) as a fraction of 2**64."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def _process_unit(unit: WorkUnit) -> UnitResult:
    tok, read, val_fraction = _worker["tok"], _worker["read"], _worker["val_fraction"]
    ids: dict[str, list[int]] = {s: [] for s in SPLITS}  # flat: one list per split, documents back to back
    docs = dict.fromkeys(SPLITS, 0)
    skips: list[Skip] = []
    text_chars = 0
    batch: list[Doc] = []
    chars = 0

    def flush() -> None:
        for doc, doc_ids in zip(batch, _encode(tok, batch, skips)):
            if doc_ids is not None:
                split = "val" if is_val(doc.text, val_fraction) else "train"
                ids[split] += doc_ids
                docs[split] += 1
        batch.clear()

    for item in read_unit(unit, read):
        if isinstance(item, Skip):
            skips.append(item)
            continue
        batch.append(item)
        chars += len(item.text)
        text_chars += len(item.text)
        if chars >= _BATCH_CHARS:
            flush()
            chars = 0
    flush()
    dtype = _worker["dtype"]
    tokens = {s: np.array(ids[s], dtype=dtype) for s in SPLITS}
    return UnitResult(unit.source, tokens, docs, text_chars, skips)


def _encode(tok, docs: list[Doc], skips: list[Skip]) -> list[list[int] | None]:
    """Token ids (+ EOS) per document; a document the tokenizer rejects becomes a Skip."""
    if not docs:
        return []
    try:
        return tok.encode_batch([d.text for d in docs], eos=True)
    except (UnicodeError, TypeError, RuntimeError):  # e.g. a lone surrogate from a JSON \ud800 escape
        out: list[list[int] | None] = []
        for d in docs:
            try:
                out.append(tok.encode(d.text, eos=True))
            except (UnicodeError, TypeError, RuntimeError) as e:
                skips.append(Skip(d.where, f"cannot be tokenized ({type(e).__name__})"))
                out.append(None)
        return out


# --- main side -----------------------------------------------------------------------------


class _Packer:
    """Cuts one (source, split) token stream into windows and writes them into shards."""

    def __init__(self, out: Path, prefix: str, dtype: np.dtype, window: int, shard_tokens: int):
        self.out, self.prefix, self.dtype, self.window = out, prefix, dtype, window
        self.windows_per_shard = max(1, shard_tokens // window)
        self.pending = np.zeros(0, dtype=dtype)  # < one window, carried to the next document
        self.writer: ShardWriter | None = None
        self.shards: list[dict] = []
        self.tokens_in = 0

    def add(self, tokens: np.ndarray) -> None:
        self.tokens_in += len(tokens)
        data = np.concatenate([self.pending, tokens]) if len(self.pending) else tokens
        n_windows = len(data) // self.window
        cut = n_windows * self.window
        done = 0
        while done < cut:
            if self.writer is None:
                self.writer = ShardWriter(self.out / f"{self.prefix}.{len(self.shards):05d}.bin", self.dtype)
            room = (self.windows_per_shard * self.window) - self.writer.count
            take = min(room, cut - done)
            self.writer.write(data[done : done + take])
            done += take
            if self.writer.count == self.windows_per_shard * self.window:
                self._close_shard()
        self.pending = data[cut:].copy()

    def _close_shard(self) -> None:
        w = self.writer
        w.close()
        self.shards.append({"file": w.path.name, "tokens": w.count, "windows": w.count // self.window})
        self.writer = None

    def finish(self) -> dict:
        if self.writer is not None:
            self._close_shard()
        windows = sum(s["windows"] for s in self.shards)
        return {
            "tokens": self.tokens_in,
            "windows": windows,
            "window_tokens": windows * self.window,
            "dropped_tail_tokens": len(self.pending),
            "shards": self.shards,
        }

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _settings(cfg: PrepareConfig, tok_sha: str) -> dict:
    """Everything that determines the output: a finished directory with equal settings is reused."""
    return {
        "sources": [
            {"name": s.name, "kind": s.kind, "path": str(s.path.resolve()), "weight": s.weight} for s in cfg.sources
        ],
        "tokenizer_sha256": tok_sha,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "read": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.read).items()},
    }


def _clean_leftovers(out: Path) -> None:
    for p in out.iterdir():
        if _SHARD_NAME.match(p.name):
            p.unlink()


def _units(cfg: PrepareConfig) -> tuple[list[WorkUnit], list[list[Skip]]]:
    units: list[WorkUnit] = []
    plan_skips: list[list[Skip]] = [[] for _ in cfg.sources]
    for i, spec in enumerate(cfg.sources):
        for item in plan_units(i, spec, cfg.read):
            if isinstance(item, Skip):
                plan_skips[i].append(item)
            else:
                units.append(item)
    return units, plan_skips


def _results(cfg: PrepareConfig, units: list[WorkUnit], init_args: tuple):
    """UnitResults in unit order; at most 2 units in flight per worker (bounded memory)."""
    if cfg.workers <= 1:
        _init_worker(*init_args)
        for u in units:
            yield _process_unit(u)
        return
    fork = "fork" in mp.get_all_start_methods()
    if fork:  # load the tokenizer once here: the forked workers inherit it instead of each loading it
        _init_worker(*init_args)
    ctx = mp.get_context("fork" if fork else "spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=init_args) as pool:
        queue: deque = deque()
        todo = iter(units)
        for u in itertools.islice(todo, 2 * cfg.workers):
            queue.append(pool.apply_async(_process_unit, (u,)))
        while queue:
            result = queue.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                queue.append(pool.apply_async(_process_unit, (nxt,)))
            yield result


@dataclass
class _SourceStats:
    """What the manifest says about one source, accumulated as results arrive."""

    docs: Counter = field(default_factory=Counter)  # split -> documents
    text_chars: int = 0
    skips: list[Skip] = field(default_factory=list)

    def entry(self, spec: SourceSpec, splits: dict[str, dict]) -> dict:
        return {
            "name": spec.name,
            "kind": spec.kind,
            "path": str(spec.path.resolve()),
            "weight": spec.weight,
            "text_chars": self.text_chars,
            "documents": sum(self.docs[s] for s in SPLITS),
            "tokens": sum(splits[s]["tokens"] for s in SPLITS),
            "splits": {s: {"documents": self.docs[s], **splits[s]} for s in SPLITS},
            "skipped": {
                "count": len(self.skips),
                "by_reason": skips.counts_by_reason(self.skips),
                "documents": [{"where": sk.where, "reason": sk.reason} for sk in self.skips[:_MAX_NAMED_SKIPS]],
            },
        }


def prepare(cfg: PrepareConfig) -> dict:
    """Run the pipeline; returns the manifest (also written to OUT/manifest.json)."""
    if cfg.seq_len < 1:
        raise SlmError(f"--seq-len must be >= 1, got {cfg.seq_len}")
    if not 0 <= cfg.val_fraction < 1:
        raise SlmError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if not cfg.sources:
        raise SlmError("no --source given")
    cfg = replace(cfg, sources=name_sources(cfg.sources))
    tok = Tokenizer.load(cfg.tokenizer)
    if tok.eos_id is None:
        raise SlmError(f"{cfg.tokenizer}: tokenizer has no EOS token; documents must end with EOS")
    tok_sha = file_sha256(tok.path)
    settings = _settings(cfg, tok_sha)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SlmError(f"--out {out}: exists and is not a directory")
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        if old.get("settings") == settings and not cfg.overwrite:
            _log(cfg, f"{out}: already prepared with these settings (manifest.json); nothing to do")
            return old
        if not cfg.overwrite:
            raise SlmError(f"{out}: holds data prepared with other settings; use --overwrite or another --out")
    t0 = time.perf_counter()
    units, plan_skips = _units(cfg)  # before --out is touched: a missing source creates nothing
    if manifest_path.is_file():
        manifest_path.unlink()  # first, so the directory never looks finished while shards change
    out.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)  # shards a killed run left half-written
    _clean_leftovers(out)

    dtype = token_dtype(tok.vocab_size)
    stats, splits = _pack(cfg, out, str(tok.path), dtype, units, plan_skips)
    sources = [st.entry(spec, splits[i]) for i, (spec, st) in enumerate(zip(cfg.sources, stats))]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "seq_len": cfg.seq_len,
        "window": cfg.seq_len + 1,
        "windowing": "non-overlapping windows of seq_len + 1 tokens over each source's concatenated documents "
        "(input window[:-1], target window[1:]); each source and split's incomplete last window is dropped",
        "dtype": dtype.name,
        "documents": "tokenized without BOS, each followed by EOS",
        "split_rule": "a document is in val when blake2b-64(utf-8 text) / 2**64 < val_fraction",
        "tokenizer": {
            "path": str(tok.path.resolve()),  # absolute: read by training runs started elsewhere
            "sha256": tok_sha,
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "val_fraction": cfg.val_fraction,
        "sources": sources,
        "totals": {
            "documents": sum(s["documents"] for s in sources),
            "tokens": sum(s["tokens"] for s in sources),
            "skipped": sum(s["skipped"]["count"] for s in sources),
            **{f"{sp}_windows": sum(s["splits"][sp]["windows"] for s in sources) for sp in SPLITS},
            "text_chars": sum(s["text_chars"] for s in sources),
            "seconds": round(time.perf_counter() - t0, 3),
        },
        "settings": settings,
    }
    write_json(manifest_path, manifest)  # last: its presence means every shard is complete
    for spec, st in zip(cfg.sources, stats):
        skips.summarise(spec.name, st.skips, cfg.show_skipped)
    return manifest


def _pack(cfg: PrepareConfig, out: Path, tokenizer_path: str, dtype: np.dtype, units: list[WorkUnit],
          plan_skips: list[list[Skip]]):
    """Tokenize every unit (in workers) and pack the results in unit order.

    Returns per-source stats and per-source {split: packer summary}.
    """
    stats = [_SourceStats(skips=list(sk)) for sk in plan_skips]
    for st in stats:
        skips.check_strict(cfg.strict, st.skips)
        skips.report(st.skips, [], cfg.show_skipped)
    packers = [
        {s: _Packer(out, f"{spec.name}.{s}", dtype, cfg.seq_len + 1, cfg.shard_tokens) for s in SPLITS}
        for spec in cfg.sources
    ]
    bar = _progress_bar(cfg, sum(u.size for u in units))
    docs = tokens = 0
    try:
        init_args = (tokenizer_path, cfg.read, cfg.val_fraction)
        for unit, res in zip(units, _results(cfg, units, init_args)):
            st = stats[res.source]
            skips.check_strict(cfg.strict, res.skips)
            skips.report(res.skips, st.skips, cfg.show_skipped, bar)
            st.skips.extend(res.skips)
            st.text_chars += res.text_chars
            for s in SPLITS:
                packers[res.source][s].add(res.tokens[s])
                st.docs[s] += res.docs[s]
                docs += res.docs[s]
                tokens += len(res.tokens[s])
            if bar is not None:
                bar.update(unit.size)
                bar.set_postfix(docs=docs, tokens=tokens, refresh=False)
        splits = [{s: p.finish() for s, p in by_split.items()} for by_split in packers]
    except BaseException:
        for by_split in packers:
            for p in by_split.values():
                p.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return stats, splits


def _log(cfg: PrepareConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr)


def _progress_bar(cfg: PrepareConfig, total_bytes: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)  # shows MB/s
