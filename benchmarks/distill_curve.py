"""Acceptance against distillation minutes, for each form of distilled draft, and the decision
between them: a feature head (reads the target's hidden states) or a standalone one-layer draft
on the target's embeddings, both with the same trimmed vocabulary, trained on the same samples.

    python benchmarks/distill_curve.py --work /tmp/distill-curve --minutes 30 --snapshots 1 2 4 6 9 12 15
    python benchmarks/distill_curve.py --work /tmp/distill-curve --minutes 30 --forms features standalone
    python benchmarks/distill_curve.py --work /tmp/dc --minutes 1 --snapshots 0.2 0.4 --max-prompts 16 \
        --max-new-tokens 32 --seq-len 128                                  # a dry run

One run per form: the snapshots are taken during that one distillation (training minutes), and
the curve's x axis is distillation minutes, generating the samples included.

For every snapshot: greedy acceptance of the 1st..Kth drafted token on held-out samples (each
given the earlier ones were accepted: exactly what greedy speculative decoding sees on those
samples), the draft's cost per token relative to one target decode step (both timed here), and
the predicted speedup at the best K (verify cost v = 1, as on a GPU, and v as measured on this
CPU). The forms are compared at equal training minutes. Writes results.json and curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch


def step_seconds(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def costs(model, head, context: int = 200) -> dict:
    """Seconds of one target decode step, one target verify of 5 tokens, one head draft step."""
    from slm.speculative.lm import as_lm

    lm = as_lm(model)
    lm.prepare(context + 8)
    lm.forward(list(range(1, context)), 0)
    target_s = step_seconds(lambda: lm.forward([5], context))
    verify_s = step_seconds(lambda: lm.forward([5, 6, 7, 8, 9], context))
    head.setup_cache(context + 8)
    h = head.step([5], 0, torch.zeros(1, head.config.dim) if head.config.features else None)
    head_s = step_seconds(lambda: head.logits(head.step([5], context, h if head.config.features else None)[-1]))
    return {"target_step_s": target_s, "verify5_over_step": verify_s / target_s, "c": head_s / target_s}


def best_speedup(per_depth: list[float], c: float, v: float) -> tuple[float, int]:
    best = (1.0, 0)
    for k in range(1, len(per_depth) + 1):
        expected, run = 1.0, 1.0
        for a in per_depth[:k]:
            run *= a
            expected += run
        best = max(best, (expected / (k * c + v), k))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="model argument (default: the real SmolLM2-135M-Instruct)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--minutes", type=float, default=30.0, help="per form: the feature head's whole budget")
    ap.add_argument("--snapshots", type=float, nargs="+", default=[1, 2, 4, 6, 9, 12, 15],
                    help="training minutes at which the head is saved and scored")
    ap.add_argument("--forms", nargs="+", default=["features"], choices=["features", "standalone"],
                    help="features (the default draft); add standalone for the ablation (a second run as long)")
    ap.add_argument("--max-prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2, help="training unroll; the acceptance is scored at 4 positions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-png", type=Path, default=None, help="also write the curve here (e.g. docs/distill_curve.png)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from slm.assets import smollm2_gguf
    from slm.distill import DistillConfig, TrainSettings, distill
    from slm.distill.cache import FeatureCache
    from slm.distill.objective import acceptance_by_depth
    from slm.distill.run import FEATURES_FILE, SAMPLES_FILE, held_out_batches, pick, split
    from slm.distill.samples import Samples
    from slm.load import load_any, load_distilled

    target = args.target or str(smollm2_gguf())
    model, _ = load_any(target)
    results = {"target": target, "forms": {}}
    first_samples = None
    for form in args.forms:
        out = args.work / form
        if first_samples is not None and not (out / SAMPLES_FILE).exists():
            out.mkdir(parents=True, exist_ok=True)
            for name in (SAMPLES_FILE, FEATURES_FILE):  # the same samples (and labels) for every form
                shutil.copy(first_samples / name, out / name)
        cfg = DistillConfig(minutes=args.minutes, max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens,
                            draft_vocab=args.draft_vocab, features=form == "features",
                            snapshot_minutes=tuple(args.snapshots),
                            train=TrainSettings(seconds=0, batch_size=args.batch_size, seq_len=args.seq_len,
                                                depth=args.depth))
        t0 = time.perf_counter()
        distill(target, out, cfg)
        first_samples = first_samples or out
        report = json.loads((out / "draft_head.json").read_text())["distill"]
        samples = Samples.load(out / SAMPLES_FILE)
        _, test_idx = split(samples, cfg.held_out)
        batches = held_out_batches(pick(samples, test_idx), FeatureCache.load(out / FEATURES_FILE).select(test_idx),
                                   args.seq_len, 2)
        points = []
        for snap in sorted((out / "snapshots").glob("*min"), key=lambda p: float(p.name[:-3])) + [out]:
            draft = load_distilled(snap, model)
            head = draft.head
            draft.close()
            per_depth = acceptance_by_depth(head, batches, max(args.depth, 4))
            cost = costs(model, head)
            minutes = json.loads((snap / "draft_head.json").read_text())["distill"]["trained_seconds"] / 60
            point = {"trained_minutes": round(minutes, 2),
                     "distill_minutes": round(minutes + samples.seconds / 60, 2),  # generating included
                     "acceptance_by_depth": [round(a, 4) for a in per_depth],
                     **{k: round(v, 4) for k, v in cost.items()}}
            for name, v in (("gpu_v1", 1.0), ("cpu_v", cost["verify5_over_step"])):
                s, k = best_speedup(per_depth, cost["c"], v)
                point[f"predicted_speedup_{name}"], point[f"best_k_{name}"] = round(s, 3), k
            points.append(point)
            print(json.dumps({"form": form, **point}), flush=True)
        results["forms"][form] = {"report": report, "points": points, "wall_s": round(time.perf_counter() - t0, 1)}

    from slm.atomic import replace_file, tmp_name, write_json

    write_json(args.work / "results.json", results)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'slm[plot]'): no curve.png")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for form, r in results["forms"].items():
        xs = [p["distill_minutes"] for p in r["points"]]
        for j, style in ((0, "-o"), (1, "--s")):
            ys = [p["acceptance_by_depth"][j] if len(p["acceptance_by_depth"]) > j else 0 for p in r["points"]]
            ax.plot(xs, ys, style, label=f"{form}: draft token {j + 1}")
    ax.set_xlabel("distillation minutes (generating the samples included)")
    ax.set_ylabel("greedy acceptance (held-out samples)")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Distilled draft for SmolLM2-135M-Instruct" if args.target is None else "Distilled draft")
    fig.tight_layout()
    for path in [args.work / "curve.png"] + ([args.out_png] if args.out_png else []):
        tmp = tmp_name(path)
        fig.savefig(tmp, dpi=120, format="png")
        replace_file(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
