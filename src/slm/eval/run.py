"""`slm eval`: load a model directory, read each task's documents, score them, aggregate."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from slm.errors import SlmError
from slm.eval.data import load_documents
from slm.eval.loglikelihood import RequestEncoder, loglikelihoods
from slm.eval.metrics import aggregate
from slm.eval.tasks import FieldError, Item, get_task, score_item
from slm.load import load_model


@dataclass
class TaskResult:
    task: str
    n_items: int
    source: str  # where the documents came from
    metrics: dict[str, float]
    stderrs: dict[str, float | None]
    # Per item: the log-likelihood of each request and the item's scores (for comparisons and audits).
    samples: list[dict] = field(default_factory=list, repr=False)


def build_items(task_name: str, data_dir, limit: int | None) -> tuple[list[Item], str]:
    task = get_task(task_name)
    docs, source = load_documents(task.name, task.dataset, data_dir, limit)  # lm_eval's --limit: the first N
    if not docs:
        raise SlmError(f"{task.name}: no documents in {source}")
    items = []
    for i, doc in enumerate(docs):
        try:
            items.append(task.to_item(doc))
        except FieldError as e:  # line = record number (JSON Lines without blank lines; a parquet row)
            raise SlmError(f"{source}:{i + 1}: {task.name}: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a row not in the official format
            raise SlmError(
                f"{task.name}: document {i + 1} of {source} is not in the {task.dataset.hf_path} format "
                f"({type(e).__name__}: {e}; fields: {', '.join(doc)})"
            ) from None
    return items, source


def evaluate(
    model_dir: str | os.PathLike,
    tasks: list[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    bootstrap_iters: int = 100_000,
    model=None,
    encoder=None,
) -> list[TaskResult]:
    """Score `tasks` zero-shot with the model in `model_dir`.

    `model` and `encoder` (a `RequestEncoder`): already loaded from `model_dir`, for callers that
    evaluate several times (as lm_eval's model object keeps its weights and tokenizer)."""
    if batch_size < 1:
        raise SlmError(f"--batch-size must be >= 1, got {batch_size}")
    if not os.path.isdir(model_dir):  # the tokenizer files must be beside the weights
        raise SlmError(f"{model_dir}: not a model directory (for a .gguf file, run `slm import FILE --out DIR` first)")
    task_items = {name: build_items(name, data_dir, limit) for name in tasks}  # fail on missing data first
    if model is None:
        model = load_model(model_dir)
    if encoder is None:
        encoder = RequestEncoder.for_model_dir(model_dir)
    out = []
    for name, (items, source) in task_items.items():
        task = get_task(name)
        encoded = [encoder.encode_pairs([(r.context, r.continuation) for r in it.requests]) for it in items]
        results = loglikelihoods(model, encoded, batch_size=batch_size, progress=progress)
        per_item = [score_item(task, it, res) for it, res in zip(items, results)]
        metrics, stderrs = {}, {}
        for m in task.metrics:
            metrics[m], stderrs[m] = aggregate(m, [s[m] for s in per_item], bootstrap_iters)
        samples = [{"loglikelihoods": [ll for ll, _ in res], "is_greedy": [g for _, g in res], "gold": it.gold, **s}
                   for it, res, s in zip(items, results, per_item)]
        out.append(TaskResult(name, len(items), source, metrics, stderrs, samples))
    return out


def results_json(results: list[TaskResult], samples: bool = False) -> dict:
    return {
        "results": {
            r.task: {"n_items": r.n_items, "source": r.source, **r.metrics,
                     **{f"{m}_stderr": e for m, e in r.stderrs.items()}}
            for r in results
        },
        **({"samples": {r.task: r.samples for r in results}} if samples else {}),
    }


def format_table(results: list[TaskResult]) -> str:
    rows = [("task", "n", "metric", "value", "stderr")]
    for r in results:
        for m, v in r.metrics.items():
            e = r.stderrs[m]
            rows.append((r.task, str(r.n_items), m, f"{v:.4f}", "N/A" if e is None else f"{e:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

