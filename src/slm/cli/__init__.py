"""The `slm` command: argument parsing only.

Each group of subcommands lives in its own module here and exposes
`register(subparsers)`, which adds its parsers and sets `func` to a small
function that calls one plain library function. Heavy imports (torch,
transformers) happen inside those functions so that `slm --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

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
    "slm.cli.serve",  # serve
]


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N` for commands that run a model on the CPU (see `apply_threads`)."""
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for torch (default: the cores that are free right now, at least 1; "
        "see slm.threads)",
    )  # fmt: skip


def apply_threads(args: argparse.Namespace) -> None:
    from slm.threads import set_threads

    set_threads(args.threads)


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


class _Terminated(BaseException):
    """SIGTERM as an exception, so that `finally` blocks (temporary files of slm.atomic) run."""


_MAIN_PID = os.getpid()


def _raise_terminated(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked worker (data prepare's pool) inherited this: die as usual
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    # Not under torchrun: its agent stops a failed job's ranks with SIGTERM, and a rank blocked in a
    # collective would only see the exception after the agent's grace period.
    catch_term = threading.current_thread() is threading.main_thread() and "TORCHELASTIC_RUN_ID" not in os.environ
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if catch_term else None
    try:
        code = args.func(args)
    except SlmError as e:
        print(f"slm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slm: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("slm: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `slm generate ... | head`
        return 0
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
