"""`slm generate` end to end: output formats, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "slm", *args], capture_output=True, text=True, timeout=120)


def test_generate_json(tiny_model_dir):
    r = run("generate", str(tiny_model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--json",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"text", "tokens", "new_tokens", "seconds", "tokens_per_second"} <= out.keys()
    assert out["new_tokens"] == len(out["tokens"]) <= 8


def test_generate_text_is_the_completion_only(tiny_model_dir):
    a = run("generate", str(tiny_model_dir), "--prompt", "The quick", "--max-new-tokens", "6", "--json")
    b = run("generate", str(tiny_model_dir), "--prompt", "The quick", "--max-new-tokens", "6")
    assert b.returncode == 0, b.stderr
    assert b.stdout == json.loads(a.stdout)["text"] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "2"], "top-p must be in"),
        (["--prompt", "x" * 2000], "but the model's context is 128"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_model_dir, args, message):
    base = ["generate", str(tiny_model_dir), "--prompt", "hi"]
    r = run(*base, *args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("slm: error:") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_and_corrupt_model(tmp_path):
    r = run("generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    r = run("generate", str(tmp_path / "bad"), "--prompt", "hi")
    assert r.returncode == 2 and "missing field(s)" in r.stderr and r.stderr.count("\n") == 1
