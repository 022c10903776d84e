"""Shared helpers for the tokenizer/data tests: a seeded synthetic corpus and a tiny tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one "
    "you were all we her she there would their will when who him been has more if no out do so can what up "
    "said about other into than its time only could new them man some these then two first may any like now "
    "def return class import self None True False print range len yield lambda 0 1 2 42 1999 é ü 你好 🙂"
).split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """n distinct pseudo-random documents (seeded), with newlines, digits and some non-ASCII."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        for k in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words)), "\n")
        docs.append(f"doc {i}: " + " ".join(words).replace(" \n ", "\n"))
    return docs


def write_text_files(folder: Path, docs: list[str], suffix: str = ".txt") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(docs):
        p = folder / f"doc{i:04d}{suffix}"
        p.write_text(d, encoding="utf-8")
        paths.append(p)
    return paths


def train_tiny_tokenizer(out: Path, vocab_size: int = 400) -> Path:
    """A real LLaMA-style SentencePiece BPE tokenizer trained on the synthetic corpus (< 1 s)."""
    from slm.tokenizer import train_tokenizer

    corpus = out.parent / (out.name + "-corpus")
    write_text_files(corpus, make_docs(300, seed=123))
    return train_tokenizer([corpus], out, vocab_size=vocab_size, threads=1)


def prepare_dir(out: Path, sources: list[str], tokenizer: Path, **kw) -> dict:
    """Run `prepare` on `KIND:PATH[:WEIGHT]` specs; small windows and no val split by default."""
    from slm.data.prepare import PrepareConfig, prepare
    from slm.data.sources import ReadOptions, parse_source

    read = ReadOptions(**kw.pop("read", {}))
    kw.setdefault("seq_len", 8)
    kw.setdefault("val_fraction", 0.0)
    return prepare(PrepareConfig([parse_source(s) for s in sources], str(tokenizer), out, read=read, **kw))


def read_stream(data_dir: Path, source: str, split: str = "train") -> list[int]:
    """All window tokens of one source and split, in order (shards concatenated)."""
    import json

    from slm.data.shards import open_shard

    manifest = json.loads((data_dir / "manifest.json").read_text())
    (src,) = [s for s in manifest["sources"] if s["name"] == source]
    out: list[int] = []
    for sh in src["splits"][split]["shards"]:
        out.extend(open_shard(data_dir / sh["file"]).tolist())
    return out


def expected_stream(tok, docs: list[str]) -> list[int]:
    """What prepare must write for these documents in this order: each without BOS, then EOS."""
    out: list[int] = []
    for d in docs:
        out.extend(tok.encode(d, eos=True))
    return out
