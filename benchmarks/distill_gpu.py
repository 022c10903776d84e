"""Distillation on a lent GPU (written for an H200; one run under 8 minutes): the target answers
the distillation prompts at GPU batch sizes (its features and labels kept as it answers,
`slm.distill.cache`), the head trains on them (bf16 autocast), then the first 20 HumanEval prompts are decoded greedily
with the target alone, with the distilled draft, and with prompt lookup in front of it.

    python benchmarks/distill_gpu.py                                  # on the GPU: SmolLM2-135M-Instruct
    python benchmarks/distill_gpu.py --device cpu --tiny              # smoke test of the script itself

Prints one JSON line per stage: the distillation report (samples, answer tokens, training
tokens/s, held-out acceptance per draft position) and per decoding engine tokens/s, speedup
over the target alone, acceptance and acceptance per draft position. Outputs must equal the
target's own (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--target", default=None, help="model argument (default: the real SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path, default=None, help="draft directory (default: a temporary one)")
    ap.add_argument("--minutes", type=float, default=6.0, help="distillation budget, generating included")
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--depth", type=int, default=7, help="training-time-test steps (EAGLE-3: 7)")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--max-prompts", type=int, default=6000,
                    help="prompts built (parsing the standard library is CPU time inside the budget)")
    ap.add_argument("--prompts", type=int, default=20, help="HumanEval prompts decoded")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=5, help="the fixed draft length row")
    ap.add_argument("--tiny", action="store_true", help="minimal settings: check that the script runs")
    args = ap.parse_args()
    if args.tiny:
        args.minutes, args.gen_batch, args.train_batch, args.seq_len, args.depth = 0.5, 4, 2, 96, 2
        args.max_prompts, args.prompts, args.new_tokens, args.draft_vocab = 8, 1, 8, 512
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    from slm.assets import smollm2_gguf
    from slm.distill import DistillConfig, TrainSettings, distill
    from slm.eval.humaneval_generate import build_prompt, select_problems
    from slm.generate import Stop, generate
    from slm.load import load_any, load_draft
    from slm.tokenizer import Tokenizer

    target = args.target or str(smollm2_gguf())
    out = args.out or Path(tempfile.mkdtemp(prefix="distill-gpu-"))
    t0 = time.perf_counter()
    cfg = DistillConfig(minutes=args.minutes, generate_share=0.3, max_prompts=args.max_prompts,
                        max_new_tokens=192 if not args.tiny else 16, gen_batch_size=args.gen_batch,
                        draft_vocab=args.draft_vocab, device=args.device,
                        train=TrainSettings(seconds=0, batch_size=args.train_batch, seq_len=args.seq_len,
                                            depth=args.depth, checkpoint_every_s=60.0))
    distill(target, out, cfg)
    report = json.loads((out / "draft_head.json").read_text())["distill"]
    print(json.dumps({"stage": "distill", "device": str(device), "wall_s": round(time.perf_counter() - t0, 1),
                      **report}), flush=True)

    model, model_dir = load_any(target)
    model.to(device).eval()
    tok = Tokenizer.load(model_dir)
    problems = list(select_problems(None, args.prompts).values())
    prompts = [tok.encode(build_prompt(p, "chat", model_dir)) for p in problems]
    engines = {"target": None, f"distilled K={args.k}": (str(out), args.k), "distilled auto": (str(out), "auto"),
               "auto:distilled auto": (f"auto:{out}", "auto"), "ngram auto": ("ngram", "auto")}
    ref = None
    base_s = None
    for name, spec in engines.items():
        draft = None if spec is None else load_draft(spec[0], model, model_dir)
        k = "auto" if spec is None else spec[1]
        generate(model, prompts[0], 8, draft=draft, draft_tokens=k, stop=Stop())  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        results = [generate(model, p, args.new_tokens, draft=draft, draft_tokens=k, stop=Stop()) for p in prompts]
        seconds = time.perf_counter() - t1
        tokens = [r.tokens for r in results]
        if ref is None:
            ref, base_s = tokens, seconds
        elif tokens != ref:
            raise SystemExit(f"{name}: output differs from the target's own greedy output")
        row = {"stage": "decode", "engine": name, "tokens_per_s": round(sum(map(len, tokens)) / seconds, 1),
               "speedup": round(base_s / seconds, 3)}
        if draft is not None:
            drafted = sum(r.stats["draft_n"] for r in results)
            row["acceptance"] = round(sum(r.stats["draft_n_accepted"] for r in results) / max(drafted, 1), 3)
            per_pos = [sum(r.stats["accepted_per_pos"][i] for r in results if len(r.stats["accepted_per_pos"]) > i)
                       for i in range(max(len(r.stats["accepted_per_pos"]) for r in results))]
            rounds = sum(len(r.stats["accepted_per_round"]) for r in results)
            row["acceptance_by_position"] = [round(a / b, 3) if b else None
                                             for a, b in zip(per_pos, [rounds] + per_pos[:-1])]
            if hasattr(draft, "close"):
                draft.close()
            elif hasattr(getattr(draft, "model", None), "close"):
                draft.model.close()
        print(json.dumps(row), flush=True)
    print(json.dumps({"stage": "done", "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
