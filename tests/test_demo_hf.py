"""`slm demo` with a transformers target and a transformers draft (models slm's own decoder does not
run): the demo's path for models that only transformers loads, end to end, in seconds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _hf_dir(path, tokenizer_dir, seed: int, layers: int):
    """A tiny random LLaMA with attention and MLP biases (which slm's decoder refuses), with the test tokenizer."""
    from slm.tokenizer import Tokenizer

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=Tokenizer.load(tokenizer_dir).vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        attention_bias=True, mlp_bias=True, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_demo_with_transformers_target_and_draft(tmp_path, tokenizer_dir):
    from slm.demo import DemoConfig, run_demo
    from slm.eval.humaneval_generate import select_problems
    from slm.load import is_transformers_dir
    from slm.tokenizer import Tokenizer

    target_dir = _hf_dir(tmp_path / "target", tokenizer_dir, seed=0, layers=2)
    draft_dir = _hf_dir(tmp_path / "draft", tokenizer_dir, seed=1, layers=1)
    assert is_transformers_dir(target_dir) and is_transformers_dir(draft_dir)
    work = tmp_path / "work"
    cfg = DemoConfig(work_dir=work, target=str(target_dir), drafts=(str(draft_dir),), train_minutes=1.0,
                     prompts=2, max_new_tokens=8, prompt_format="raw", workers=1, progress=False)
    summary = run_demo(cfg)

    # No trained draft and no int4 self-draft for a transformers target: those rows are skipped.
    assert [r.label for r in summary] == ["target only", "prompt lookup", "draft draft"]
    assert all(r.identical for r in summary)  # every draft gives the target's own greedy tokens
    rows = json.loads((work / "summary.json").read_text())
    assert [r["label"] for r in rows] == [r.label for r in summary]
    results = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert len(results) == 3 * 2
    # The target-only tokens are transformers' own greedy continuation (no stop token in 8).
    hf = transformers.AutoModelForCausalLM.from_pretrained(target_dir).eval()
    tok = Tokenizer.load(target_dir)
    problem = next(iter(select_problems(None, 1).values()))
    ids = torch.tensor([tok.encode(problem.prompt)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      pad_token_id=0)[0, ids.shape[1]:].tolist()
    first = next(r for r in results if r["row"] == "target only" and r["task_id"] == problem.task_id)
    assert first["tokens"] == ref[: len(first["tokens"])] and len(first["tokens"]) >= 1
    report = (work / "report.md").read_text()
    assert "| target only |" in report and "## Findings" in report
    # A re-run reuses every generation.
    run_demo(cfg)
    assert len((work / "results.jsonl").read_text().splitlines()) == 6


def test_cli_generate_with_a_transformers_model(tmp_path, tokenizer_dir, capsys):
    """`slm generate MODEL` resolves a transformers directory through slm.load like the demo does."""
    from slm.cli import main
    from slm.tokenizer import Tokenizer

    model_dir = _hf_dir(tmp_path / "m", tokenizer_dir, seed=2, layers=1)
    assert main(["generate", str(model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "6", "--json",
                 "--draft", "ngram"]) == 0
    out = json.loads(capsys.readouterr().out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([Tokenizer.load(model_dir).encode("def add(a, b):")])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                      pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert out["tokens"] == ref[: len(out["tokens"])] and out["tokens"]
    assert main(["generate", str(model_dir), "--prompt", "x", "--quantize", "int8"]) == 2
    assert "--quantize needs a model slm runs itself" in capsys.readouterr().err
