"""`slm demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: distill a draft, speed up a real model on HumanEval",
        description="AMD-135M's story on this machine: import the real SmolLM2-135M-Instruct (target), distill "
        "a draft head for it with `slm distill` for a time budget (the target answers requests built from the "
        "Python standard library), then decode the first HumanEval prompts greedily with the target alone and "
        "with each draft (the distilled draft, the target's own int4 copy, prompt lookup, auto), execute the "
        "completions in the "
        "sandbox, and print a table (acceptance rate, tokens/s, speedup, pass@1) and write report.md with a "
        "plot. Re-runs reuse finished steps; an interrupted run resumes.",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="where everything goes (default: ~/.cache/slm/demo)")
    p.add_argument("--target", default=None, help="target: model dir, .gguf, or transformers dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", action="append", default=[], metavar="DRAFT",
                   help="an extra draft to compare (model dir, .gguf or transformers dir); repeatable")
    p.add_argument("--train-minutes", type=float, default=8.0,
                   help="time budget for distilling the draft, the target's answers included (default 8; 0 = none)")
    p.add_argument("--prompts", type=int, default=20, help="number of HumanEval prompts (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most (default 128)")
    p.add_argument("--draft-tokens", default="auto", metavar="K|auto", help="draft tokens per round (default auto)")
    p.add_argument("--seq-len", type=int, default=256, help="the distillation's training sequence length (default 256)")
    p.add_argument("--corpus", default=None,
                   help="folder of .py files to build the distillation's requests from (default: the standard library)")
    p.add_argument("--prompt-format", choices=["chat", "raw"], default="chat",
                   help="HumanEval prompt: the chat template asking for the function (default), or the raw code prompt")
    p.add_argument("--workers", type=int, default=2, help="processes for code execution")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from slm.demo import DemoConfig, run_demo
    from slm.speculative import parse_draft_tokens

    cfg = DemoConfig(
        target=args.target, drafts=tuple(args.draft), train_minutes=args.train_minutes, prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        draft_tokens=parse_draft_tokens(args.draft_tokens), seq_len=args.seq_len, corpus=args.corpus,
        workers=args.workers, prompt_format=args.prompt_format, progress=sys.stderr.isatty(),
    )
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    run_demo(cfg)
    return 0
