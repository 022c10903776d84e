"""Items/s of `slm eval` against lm-evaluation-harness (HF backend) on the same model, task and data.

Both run in this process on the same documents, end to end from documents to metrics (the models
are loaded once, before timing), interleaved A,B,A,B after a warm-up. Scores must agree: per-item
log-likelihoods within 1e-4 and identical acc/acc_norm, else the benchmark fails.

    python benchmarks/eval.py --model /path/to/model_dir            # real PIQA, first 200 items
    python benchmarks/eval.py --model DIR --task hellaswag --data-dir DIR --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# lm_eval's definition of each task, pointed at a local jsonl file (see tests/test_eval_lm_eval.py).
_LM_EVAL_YAML = {
    "piqa": """output_type: multiple_choice
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]
""",
    "hellaswag": """output_type: multiple_choice
process_docs: !function lm_eval.tasks.hellaswag.utils.process_docs
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]
""",
    "sciq": """output_type: multiple_choice
doc_to_text: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"
doc_to_target: 3
doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"
metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]
""",
    "arc_easy": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]
""",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (loaded by slm and by transformers)")
    ap.add_argument("--task", default="piqa", choices=sorted(_LM_EVAL_YAML))
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="slm: items per forward; lm_eval: this x choices")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from slm.eval.loglikelihood import RequestEncoder
    from slm.eval.run import build_items, evaluate
    from slm.load import load_model

    items, source = build_items(args.task, args.data_dir, args.limit)
    n_choices = max(len(it.requests) for it in items)
    work = Path(tempfile.mkdtemp(prefix="slm-bench-eval-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
    # lm_eval reads the same documents (slm's reader output, i.e. HF-format rows) from one jsonl file.
    from slm.eval.data import load_documents
    from slm.eval.tasks import get_task

    docs, _ = load_documents(args.task, get_task(args.task).dataset, args.data_dir)
    (work / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[: args.limit]))
    (work / "tasks").mkdir()
    (work / "tasks" / "bench.yaml").write_text(
        f"task: bench_{args.task}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {work / 'docs.jsonl'}\n"
        "training_split: null\nvalidation_split: validation\ntest_split: null\n" + _LM_EVAL_YAML[args.task]
    )
    task_manager = TaskManager(include_path=str(work / "tasks"))
    hf = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size * n_choices)
    # Both keep their weights and tokenizer across runs (lm_eval's HFLM object holds both).
    ours_model, ours_encoder = load_model(args.model), RequestEncoder.for_model_dir(args.model)

    def run_lm_eval():
        return lm_eval.simple_evaluate(model=hf, tasks=[f"bench_{args.task}"], task_manager=task_manager,
                                       log_samples=True, bootstrap_iters=0, verbosity="ERROR")

    def run_slm():
        return evaluate(args.model, [args.task], data_dir=args.data_dir, limit=args.limit,
                        batch_size=args.batch_size, bootstrap_iters=0, model=ours_model, encoder=ours_encoder)[0]

    print(f"task {args.task}: {len(items)} items from {source}; model {args.model}; "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    ref, ours = run_lm_eval(), run_slm()  # warm-up, and the agreement check
    samples = sorted(ref["samples"][f"bench_{args.task}"], key=lambda s: s["doc_id"])
    worst = 0.0
    for s, m in zip(samples, ours.samples, strict=True):
        ref_lls = [float(r[0][0]) for r in s["resps"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(ref_lls, m["loglikelihoods"], strict=True)))
        if s["acc"] != m["acc"] or s["acc_norm"] != m["acc_norm"]:
            print(f"FAIL: item {s['doc_id']} scores differ: lm_eval {s['acc']}/{s['acc_norm']}, "
                  f"slm {m['acc']}/{m['acc_norm']}", file=sys.stderr)
            return 1
    if worst > 1e-4:
        print(f"FAIL: log-likelihoods differ by up to {worst:.2e}", file=sys.stderr)
        return 1
    res = ref["results"][f"bench_{args.task}"]
    print(f"scores identical: acc {ours.metrics['acc']:.4f} (lm_eval {res['acc,none']:.4f}), acc_norm "
          f"{ours.metrics['acc_norm']:.4f} (lm_eval {res['acc_norm,none']:.4f}); max |dLL| {worst:.2e}")

    # Wall time is what a user waits; CPU time of this process is less disturbed by a busy machine.
    wall, cpu = {"lm_eval": [], "slm": []}, {"lm_eval": [], "slm": []}
    for _ in range(args.repeats):
        for name, fn in (("lm_eval", run_lm_eval), ("slm", run_slm)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for name in ("lm_eval", "slm"):
        runs = ", ".join(f"{t:.1f}" for t in wall[name])
        print(f"{name:8s} median {med[name]:6.2f} s wall ({len(items) / med[name]:5.2f} items/s; runs {runs} s), "
              f"{med_cpu[name]:6.2f} s CPU")
    print(f"speed-up slm / lm_eval: {med['lm_eval'] / med['slm']:.2f}x wall, "
          f"{med_cpu['lm_eval'] / med_cpu['slm']:.2f}x CPU time   load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
