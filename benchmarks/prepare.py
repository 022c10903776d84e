"""Input MB/s of `slm data prepare` (1 and 2 workers) vs a straightforward single-process loop.

The peer is what one writes first: for each file, read it, `tokenizer.encode(text, eos=True)`,
append the ids to one .bin file. Both run on the same corpus (default: the Python
standard library's source, site-packages excluded) with the same tokenizer, in one
process, interleaved (peer, ours x1, ours x2, ...) after a warm-up round; medians,
ratios and the load average are printed. MB = 10**6 bytes of input files.

    python benchmarks/prepare.py --tokenizer runs/data/tok32k [--max-mb 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus_files(root: Path, max_bytes: int) -> list[Path]:
    files = []
    total = 0
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__") and not d.startswith("."))
        for n in sorted(names):
            if n.endswith(".py"):
                p = Path(dirpath) / n
                if total + p.stat().st_size > max_bytes:
                    return files
                total += p.stat().st_size
                files.append(p)
    return files


def straightforward(files: list[Path], tokenizer: str, out: Path) -> None:
    from slm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    with open(out, "wb") as f:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                np.array(tok.encode(text, eos=True), dtype=np.uint16).tofile(f)


def ours(corpus: Path, tokenizer: str, out: Path, workers: int) -> None:
    from slm.data.prepare import PrepareConfig, prepare
    from slm.data.sources import SourceSpec

    cfg = PrepareConfig([SourceSpec("code", corpus)], tokenizer, out, seq_len=2048, workers=workers, overwrite=True)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # skipped empty __init__.py files
        prepare(cfg)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir/file (e.g. one from `slm tokenizer train`)")
    ap.add_argument("--max-mb", type=float, default=12.0, help="use the first files up to this many MB (default 12)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process for every contestant

    files = corpus_files(args.corpus, int(args.max_mb * 1e6))
    mb = sum(p.stat().st_size for p in files) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"  # exactly the same files for everybody
        for i, p in enumerate(files):
            dst = corpus / f"{i // 500:03d}" / f"{i:05d}_{p.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(p)
        runs = {
            "straightforward": lambda: straightforward(files, args.tokenizer, tmp / "plain.bin"),
            "prepare x1": lambda: ours(corpus, args.tokenizer, tmp / "w1", 1),
            "prepare x2": lambda: ours(corpus, args.tokenizer, tmp / "w2", 2),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        print(f"corpus: {len(files)} files, {mb:.1f} MB from {args.corpus}; tokenizer {args.tokenizer}")
        print(f"load average before: {os.getloadavg()}")
        for r in range(args.rounds + 1):  # round 0 is the warm-up
            for name, fn in runs.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
                if r:
                    times[name].append(dt)
                    cpu[name].append(dc)
                print(f"  round {r}{' (warm-up)' if not r else ''} {name:<16} {dt:7.2f} s  {mb / dt:6.2f} MB/s  cpu {dc:6.2f} s")
        med = {k: statistics.median(v) for k, v in times.items()}
        print("medians:")
        for k, v in med.items():
            c = statistics.median(cpu[k])
            print(f"  {k:<16} {v:7.2f} s  {mb / v:6.2f} MB/s   cpu {c:6.2f} s = {mb / c:5.2f} MB per cpu-second")
        base = med["straightforward"]
        print(f"ratio prepare x1 / straightforward: {base / med['prepare x1']:.2f}x")
        print(f"ratio prepare x2 / straightforward: {base / med['prepare x2']:.2f}x")
        print(f"scaling prepare x2 / prepare x1:    {med['prepare x1'] / med['prepare x2']:.2f}x")
        print(f"load average after: {os.getloadavg()}  ({os.cpu_count()} cores)")
        print("(with a load average above the core count, workers wait for cores: wall-clock scaling is capped;")
        print(" MB per cpu-second shows the work each variant does, independent of that wait)")


if __name__ == "__main__":
    main()
