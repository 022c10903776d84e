"""Finding and reading evaluation datasets from local files in their official formats.

Layout under `--data-dir DIR` (the first match wins; `<split>` is the split lm-evaluation-harness
scores, e.g. `test` for SciQ/ARC/LAMBADA, `validation` for the others):

    DIR/<task>/<split>.jsonl | <split>.json | <split>.parquet | <split>-*.parquet
    DIR/<task>/data/<split>...                  (a Hugging Face dataset repository's data/ folder)
    DIR/<hf repo name>/<hf config>/<split>...   (e.g. DIR/ai2_arc/ARC-Easy/test-00000-of-00001.parquet)

PIQA also reads its original release (`valid.jsonl` + `valid-labels.lst`, one label per line).
Without files, a dataset already in the Hugging Face `datasets` cache is used (offline).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from slm.errors import SlmError


@dataclass(frozen=True)
class DatasetSpec:
    """Where lm-evaluation-harness gets a task's documents: a Hugging Face dataset and split."""

    hf_path: str  # e.g. "allenai/ai2_arc"
    hf_name: str | None  # the dataset config, e.g. "ARC-Easy"
    split: str  # the split lm_eval scores: test if the task has one, else validation
    # Original-release file pairs (documents, labels) accepted beside the HF formats, e.g. PIQA's.
    original: tuple[tuple[str, str], ...] = ()


def read_records(path: Path, limit: int | None = None) -> list[dict]:
    """The rows of a .jsonl/.json/.parquet file as dicts: all, or the first `limit`.

    With a limit only those rows are parsed: `--limit 100` on a large split should not pay for
    converting every row (1,838 PIQA lines parse in ~0.2 s, a noticeable share of a short run)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return (table if limit is None else table.slice(0, limit)).to_pylist()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlmError(f"{path}: cannot read ({e})") from None
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a corrupt file
        raise SlmError(f"{path}: not a readable parquet file ({e})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)[:limit]
        except json.JSONDecodeError as e:
            raise SlmError(f"{path}: not valid JSON ({e})") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SlmError(f"{path}:{i}: not a JSON line ({e})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise SlmError(f"{path}: record {bad + 1} is not a JSON object")
    return rows


def _split_files(folder: Path, split: str) -> list[Path]:
    for suffix in (".jsonl", ".json", ".parquet"):
        if (folder / f"{split}{suffix}").is_file():
            return [folder / f"{split}{suffix}"]
    return sorted(folder.glob(f"{split}-*.parquet"))  # HF shards: test-00000-of-00001.parquet


def candidate_dirs(data_dir: Path, task: str, spec: DatasetSpec) -> list[Path]:
    repo = spec.hf_path.split("/")[-1]
    dirs = [data_dir / task, data_dir / task / "data"]
    if spec.hf_name:
        dirs += [data_dir / repo / spec.hf_name, data_dir / task / spec.hf_name]
    dirs += [data_dir / repo, data_dir / repo / "data"]
    return list(dict.fromkeys(dirs))  # de-duplicated, in order


def _read_original(folder: Path, docs_name: str, labels_name: str, limit: int | None) -> list[dict]:
    docs_path, labels_path = folder / docs_name, folder / labels_name
    docs = read_records(docs_path, limit)
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    n_docs = sum(1 for line in docs_path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(labels) != n_docs:  # checked on the whole files, also when only the first rows are read
        raise SlmError(f"{labels_path}: {len(labels)} labels for {n_docs} documents in {docs_path}")
    for i, (doc, label) in enumerate(zip(docs, labels), 1):
        if not label.lstrip("-").isdigit():
            raise SlmError(f"{labels_path}:{i}: label {label!r} is not an integer")
        doc["label"] = int(label)
    return docs


def _from_datasets_cache(spec: DatasetSpec, limit: int | None) -> list[dict] | None:
    """Rows from the Hugging Face `datasets` cache, if that dataset was downloaded before."""
    cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    if not (cache / spec.hf_path.replace("/", "___")).is_dir():
        return None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the network from here
    try:
        import datasets

        ds = datasets.load_dataset(spec.hf_path, spec.hf_name, split=spec.split)
    except Exception:  # a partial or foreign cache entry: fall through to the missing-data message
        return None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def load_documents(
    task: str, spec: DatasetSpec, data_dir: str | os.PathLike | None, limit: int | None = None
) -> tuple[list[dict], str]:
    """The task's documents (all, or the first `limit`) and a description of where they came from."""
    tried = []
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise SlmError(f"--data-dir {data_dir}: no such directory")
        for folder in candidate_dirs(data_dir, task, spec):
            files = _split_files(folder, spec.split)
            if files:
                rows = []
                for f in files:  # shards in order: the first `limit` rows of the split
                    rows += read_records(f, None if limit is None else limit - len(rows))
                    if limit is not None and len(rows) >= limit:
                        break
                return rows, ", ".join(str(f) for f in files)
            for docs_name, labels_name in spec.original:
                if (folder / docs_name).is_file() and (folder / labels_name).is_file():
                    return _read_original(folder, docs_name, labels_name, limit), str(folder / docs_name)
        tried = [str(data_dir / task)]
    rows = _from_datasets_cache(spec, limit)
    if rows is not None:
        return rows, f"datasets cache: {spec.hf_path} {spec.hf_name or ''} {spec.split}".replace("  ", " ")
    where = f"{tried[0]}/" if tried else "DIR/" + task + "/ (and pass --data-dir DIR)"
    originals = "".join(f", or the original {d} + {lab}" for d, lab in spec.original)
    raise SlmError(
        f"no data for task {task}: put {spec.split}.jsonl or {spec.split}.parquet "
        f"(the '{spec.split}' split of Hugging Face {spec.hf_path}"
        f"{' config ' + spec.hf_name if spec.hf_name else ''}){originals} in {where}"
    )
