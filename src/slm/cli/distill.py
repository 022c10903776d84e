"""`slm distill`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slm.cli import add_threads_argument, apply_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a draft that makes TARGET faster (a head reading its hidden states)",
        description="Distill a speculative-decoding draft for TARGET within a time budget: the target answers "
        "prompts built from a corpus (default: the standard library's functions and docstrings, as chat "
        "requests and plain continuations, HumanEval excluded) with batched decoding, then a one-layer head "
        "reading the target's low/middle/high hidden states learns the target's distribution over a trimmed "
        "vocabulary of its most frequent output tokens, fed its own guesses for a few steps (training-time "
        "test). Writes DRAFT (use it as --draft DRAFT, or --draft auto:DRAFT with prompt lookup in front); "
        "re-running with the same settings resumes.",
    )
    p.add_argument("target", metavar="TARGET", help="model directory, .gguf, or transformers directory")
    p.add_argument("--out", required=True, type=Path, metavar="DRAFT", help="the draft directory to write")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget, generating included (default 30)")
    p.add_argument("--prompts", nargs="+", default=[], metavar="SOURCE",
                   help="directories of .py files and/or text files (default: the Python standard library)")
    p.add_argument("--generate-share", type=float, default=0.5,
                   help="of the budget, at most, for the target's answers (default 0.5; the rest trains)")
    p.add_argument("--gen-batch-size", type=int, default=None,
                   help="prompts the target answers at once (default: DistillConfig's, 8: fastest on a 2-core CPU)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="tokens the draft can propose (default 8192)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="longest target answer (default 192)")
    p.add_argument("--temperature", type=float, default=0.0, help="the target's answers: 0 = greedy (default)")
    p.add_argument("--standalone", action="store_true",
                   help="a one-layer draft on the target's embeddings that does not read its hidden states")
    p.add_argument("--depth", type=int, default=2, help="training-time-test steps (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="training sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    add_threads_argument(p)
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    from slm.distill import DistillConfig, TrainSettings, distill
    from slm.errors import SlmError

    apply_threads(args)
    for name in ("depth", "batch_size", "seq_len", "max_new_tokens", "gen_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SlmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.temperature < 0:
        raise SlmError("--lr must be > 0 and --temperature >= 0")
    cfg = DistillConfig(
        minutes=args.minutes, generate_share=args.generate_share,
        **({} if args.gen_batch_size is None else {"gen_batch_size": args.gen_batch_size}),
        prompts=args.prompts, draft_vocab=args.draft_vocab, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, features=not args.standalone,
        train=TrainSettings(seconds=0, batch_size=args.batch_size, seq_len=args.seq_len, depth=args.depth, lr=args.lr),
    )
    out = distill(args.target, args.out, cfg)
    report = json.loads((out / "draft_head.json").read_text())["distill"]
    print(json.dumps(report))
    print(f"draft written to {out}: use --draft {out} (or --draft auto:{out})")
    return 0
