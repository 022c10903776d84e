"""`slm eval`: zero-shot multiple-choice / log-likelihood benchmarks, scored as lm-evaluation-harness."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slm.cli import add_threads_argument, apply_threads

_TASKS = "sciq, winogrande, piqa, arc_easy, arc_challenge, hellaswag, lambada_openai"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on SciQ, WinoGrande, PIQA, ARC, HellaSwag, LAMBADA (lm-eval-harness scoring)",
        description="Zero-shot evaluation scored exactly as lm-evaluation-harness 0.4 (HF backend) scores it: "
        "the same prompts, tokenization and metrics (acc, acc_norm; LAMBADA acc and perplexity), with "
        "standard errors. Data comes from local files in the official Hugging Face formats: "
        "DIR/<task>/<split>.jsonl or .parquet (split: 'test' for sciq, arc_*, lambada_openai; "
        "'validation' for the others); also DIR/<task>/data/<split>-*.parquet, DIR/ai2_arc/ARC-Easy/..., "
        "PIQA's original valid.jsonl + valid-labels.lst, or the `datasets` cache.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help=f"comma-separated tasks from: {_TASKS}")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding one subfolder per task")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items per task")
    p.add_argument(
        "--batch-size", type=int, default=16, metavar="B",
        help="items (a question with all its choices) per forward pass, at most (default 16); items are "
        "sorted by length and split into batches with the least padding",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results (and per-item scores) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(p)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from slm.errors import SlmError
    from slm.eval.run import evaluate, format_table, results_json

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SlmError("--tasks: give at least one task")
    if args.limit is not None and args.limit < 1:
        raise SlmError(f"--limit must be >= 1, got {args.limit}")
    if args.json and (os.path.isdir(args.json) or args.json.endswith(os.sep)):  # before the (long) evaluation
        raise SlmError(f"--json {args.json}: is a directory; give a file name, e.g. {Path(args.json) / 'results.json'}")
    apply_threads(args)
    progress = sys.stderr.isatty() and not args.quiet
    results = evaluate(args.model, tasks, data_dir=args.data_dir, limit=args.limit,
                       batch_size=args.batch_size, progress=progress)
    print(format_table(results))
    if args.json:
        from slm.atomic import write_json

        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"model": str(args.model), **results_json(results, samples=True)}, indent=1)
    return 0
