"""The `slm` command: argument parsing only.

Each group of subcommands lives in its own module here and exposes
`register(subparsers)`, which adds its parsers and sets `func` to a small
function that calls one plain library function. Heavy imports (torch,
transformers) happen inside those functions so that `slm --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from slm.errors import SlmError

# Order here is the order in `slm --help`.
_COMMAND_MODULES = [
    "slm.cli.models",  # import, generate
    "slm.cli.data",  # tokenizer, data
    "slm.cli.train",  # train, export
    "slm.cli.distill",  # distill
    "slm.cli.eval",  # eval
    "slm.cli.humaneval",  # humaneval
    "slm.cli.demo",  # demo
]


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N` for commands that run a model on the CPU (see `apply_threads`)."""
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for torch (default: torch's choice, all cores); on a machine shared with other "
        "busy processes, 1 is often several times faster",
    )  # fmt: skip


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is None:
        return
    if args.threads < 1:
        raise SlmError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm",
        description="slm: train, run, speed up and evaluate small LLaMA-architecture language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command group not built yet
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except SlmError as e:
        print(f"slm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `slm generate ... | head`
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
