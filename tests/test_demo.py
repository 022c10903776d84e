"""`slm demo` end to end with a tiny budget: real SmolLM2 target, seconds of distillation, 2 prompts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from slm.assets import smollm2_gguf
    from slm.errors import SlmError

    try:
        smollm2_gguf()
    except SlmError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("demo")
    # A small real code corpus (two stdlib packages) keeps building the distillation requests to seconds.
    corpus = root / "corpus"
    for pkg in ("json", "email"):
        shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / pkg, corpus / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    work = root / "work"
    cmd = [sys.executable, "-m", "slm", "demo", "--work-dir", str(work), "--train-minutes", "0.1",
           "--prompts", "2", "--max-new-tokens", "24", "--corpus", str(corpus), "--seq-len", "128"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    samples = work / "draft" / "samples.safetensors"
    made_at = samples.stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert samples.stat().st_mtime_ns == made_at  # the target's answers were reused, not generated again
    return work, first, second


def test_report_has_the_table_and_findings(demo_run):
    work, first, _ = demo_run
    report = (work / "report.md").read_text()
    assert "| decoding | acceptance rate | tokens/s | speedup | pass@1 | same tokens as target |" in report
    for row in ("target only", "distilled draft", "int4 self-draft", "prompt lookup", "auto"):
        assert f"| {row}" in report, row
    assert "## Findings" in report and "speculative.png" in report
    assert (work / "speculative.png").stat().st_size > 1000
    assert "| target only |" in first.stdout  # the table is printed too


def test_every_draft_gives_the_targets_tokens(demo_run):
    work, _, _ = demo_run
    rows = json.loads((work / "summary.json").read_text())
    assert len(rows) == 5
    base = next(r for r in rows if r["label"] == "target only")
    for r in rows:
        assert r["identical"], r["label"]
        assert r["pass_at_1"] == base["pass_at_1"], r["label"]
        assert r["tokens_per_second"] > 0
    results = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert len(results) == 5 * 2  # each row x each prompt, once


def test_rerun_reuses_finished_steps(demo_run):
    work, _, second = demo_run
    assert "reusing the draft distilled before" in second.stderr
    results = (work / "results.jsonl").read_text().splitlines()
    assert len(results) == 10  # no prompt generated twice
