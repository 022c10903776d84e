"""`slm tokenizer train`, `slm data prepare` and `slm data info`."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a LLaMA-2-style tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    p = tok_sub.add_parser(
        "train",
        help="train a SentencePiece BPE tokenizer with LLaMA-2's settings",
        description="Train a LLaMA-2-style tokenizer (SentencePiece BPE, byte fallback, digits split, "
        "<unk>=0 <s>=1 </s>=2) on the lines of text files and write DIR/tokenizer.model plus tokenizer.json "
        "and tokenizer_config.json, loadable by slm and by transformers.AutoTokenizer.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text files or folders (all files inside)")
    p.add_argument("--vocab-size", type=int, default=32000, metavar="N", help="vocabulary size (default 32000)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer files to")
    p.add_argument(
        "--max-sentences", type=int, default=2_000_000, metavar="N",
        help="train on at most N lines, sampled at random when there are more (bounds memory; default 2M)",
    )  # fmt: skip
    p.set_defaults(func=_train_tokenizer)

    data = sub.add_parser("data", help="prepare training data (tokenize and pack) and inspect it")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = data_sub.add_parser(
        "prepare",
        help="tokenize raw corpora and pack them into training windows",
        description="Tokenize documents (no BOS, EOS after each) in parallel, concatenate them per source and "
        "cut them into non-overlapping windows of seq-len + 1 tokens, written as shard files plus manifest.json. "
        "Bad documents and files (not UTF-8, empty, not a regular file, over --max-doc-bytes...) are skipped, "
        "counted on stderr and named in manifest.json; --strict makes the first fatal. "
        "An interrupted run leaves no manifest.json; run the same command again to finish.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="source kinds (--source KIND:PATH[:WEIGHT], PATH a file or a folder):\n"
        "  slimpajama  .jsonl / .jsonl.zst, field 'text'; RedPajamaBook rows dropped unless --keep-books\n"
        "  gutenberg   plain-text books; Project Gutenberg header and licence footer stripped\n"
        "  parquet     .parquet, column 'text' or 'content' (read by row group)\n"
        "  code        source files with --code-ext extensions, one document per file\n"
        "  text        plain text files with --text-ext extensions, one document per file\n"
        "WEIGHT (default 1) scales the source's share in training (2 = drawn twice as often as its size\n"
        "gives); the training loader's own weights override it.",
    )
    p.add_argument("--source", action="append", required=True, metavar="KIND:PATH[:WEIGHT]", help="a source; repeat")
    p.add_argument("--tokenizer", required=True, metavar="DIR_OR_FILE", help="model/tokenizer dir, tokenizer.json or .model")
    p.add_argument("--seq-len", type=int, default=2048, metavar="N", help="training sequence length (default 2048)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="output directory")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer worker processes (default 1)")
    p.add_argument(
        "--val-fraction", type=float, default=0.005, metavar="F",
        help="fraction of documents held out for validation, chosen by a hash of the text (default 0.005)",
    )  # fmt: skip
    p.add_argument("--strict", action="store_true", help="stop at the first bad document or file")
    p.add_argument(
        "--show-skipped", action="store_true",
        help="name each skipped document or file on stderr (default: one line per source, counts by reason; "
        "every name is in manifest.json)",
    )  # fmt: skip
    p.add_argument(
        "--max-doc-bytes", type=int, default=1 << 25, metavar="N",
        help="skip a document (file, JSON line, parquet value) longer than N bytes (default 32 MiB)",
    )  # fmt: skip
    p.add_argument("--keep-books", action="store_true", help="slimpajama: keep RedPajamaBook rows")
    p.add_argument("--code-ext", nargs="+", default=[".py"], metavar="EXT", help="code: file extensions (default .py)")
    p.add_argument("--text-ext", nargs="+", default=[".txt"], metavar="EXT", help="text: file extensions (default .txt)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="DIRNAME", help="folder names to skip (e.g. site-packages)")
    p.add_argument(
        "--shard-tokens", type=int, default=1 << 28, metavar="N", help="at most N tokens per shard file (default 2^28)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished data directory prepared differently")
    p.add_argument("--json", action="store_true", help="print the manifest's totals as JSON; no progress bar")
    p.set_defaults(func=_prepare)

    p = data_sub.add_parser("info", help="summarise a prepared data directory", description="Print a data directory's sources, tokens, windows and skipped documents.")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=_info)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from slm.tokenizer import Tokenizer, train_tokenizer

    out = train_tokenizer(args.input, args.out, vocab_size=args.vocab_size, max_sentences=args.max_sentences)
    tok = Tokenizer.load(out)
    print(f"wrote {out} (vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id})", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slm.data.prepare import PrepareConfig, prepare
    from slm.data.sources import ReadOptions, parse_source
    from slm.errors import SlmError

    if args.workers < 1:
        raise SlmError(f"--workers must be >= 1, got {args.workers}")
    if args.max_doc_bytes < 1:
        raise SlmError(f"--max-doc-bytes must be >= 1, got {args.max_doc_bytes}")
    cfg = PrepareConfig(
        sources=[parse_source(s) for s in args.source],
        tokenizer=args.tokenizer,
        out=Path(args.out),
        seq_len=args.seq_len,
        workers=args.workers,
        val_fraction=args.val_fraction,
        strict=args.strict,
        shard_tokens=args.shard_tokens,
        read=ReadOptions(
            keep_books=args.keep_books,
            code_ext=tuple(args.code_ext),
            text_ext=tuple(args.text_ext),
            exclude=tuple(args.exclude),
            max_doc_bytes=args.max_doc_bytes,
        ),
        overwrite=args.overwrite,
        show_skipped=args.show_skipped,
        progress=not args.json and sys.stderr.isatty(),
    )
    manifest = prepare(cfg)
    if args.json:
        print(json.dumps(manifest["totals"]))
    else:
        _print_summary(manifest, args.out)
    return 0


def _info(args: argparse.Namespace) -> int:
    from slm.data.loader import read_manifest

    manifest = read_manifest(args.data_dir)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_summary(manifest, args.data_dir)
    return 0


def _print_summary(m: dict, where: str) -> None:
    t = m["totals"]
    print(f"{where}: seq_len {m['seq_len']}, {m['dtype']}, tokenizer {m['tokenizer']['path']} (vocab {m['tokenizer']['vocab_size']})")
    for s in m["sources"]:
        tr, va = s["splits"]["train"], s["splits"]["val"]
        print(
            f"  {s['name']:<12} {s['kind']:<10} weight {s['weight']:g}  docs {s['documents']:,}  tokens {s['tokens']:,}  "
            f"windows train {tr['windows']:,} / val {va['windows']:,}  skipped {s['skipped']['count']:,} "
            f"{s['skipped']['by_reason'] or ''}"
        )
    print(
        f"  total: {t['documents']:,} documents, {t['tokens']:,} tokens, {t['train_windows']:,} train + "
        f"{t['val_windows']:,} val windows, {t['skipped']:,} skipped"
    )
