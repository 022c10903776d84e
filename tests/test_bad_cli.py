"""Every bad CLI input of issue 13 (items 5-10): exit code 2, exactly one line on stderr, no
traceback, and nothing changed or left behind in the working tree (directory listing before/after).

Each case copies what it needs into a fresh work directory (the current directory while it
runs), so a case that wrote, renamed or deleted anything would show in the listing.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from _bad_input_common import (
    copy_run, newest_checkpoint, prepare_tiny_data, resume_args, rewrite_checksums, snapshot, train_tiny_run,
    write_tiny_gguf,
)

from slm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class World:
    model: Path  # a tiny model directory slm wrote
    run: Path  # a tiny training run with checkpoints at steps 2 and 4
    gguf: Path
    gguf_heads0: Path
    gguf_nan_eps: Path
    eval_data: Path  # piqa + hellaswag fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tokenizer_dir) -> World:
    root = tmp_path_factory.mktemp("bad_cli")
    data = prepare_tiny_data(root / "d", tokenizer_dir)
    run = train_tiny_run(data, root / "run")
    mp = pytest.MonkeyPatch()
    ggufs = [write_tiny_gguf(root / "m.gguf"),
             write_tiny_gguf(root / "heads0.gguf", mp, head_count=0),
             write_tiny_gguf(root / "nan_eps.gguf", mp, layer_norm_rms_eps=float("nan"))]
    eval_data = root / "eval"
    shutil.copytree(Path(__file__).parent / "fixtures" / "eval", eval_data)
    return World(tiny_model_dir, run, *ggufs, eval_data)


# --- case builders: (world, work dir) -> argv ---------------------------------------------------


def _notes_dir(work: Path) -> Path:
    d = work / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x\n")
    return d


def _a_file(work: Path) -> Path:
    f = work / "f"
    f.write_text("keep me\n")
    return f


def _config(**changes):
    def build(w: World, work: Path) -> list[str]:
        m = shutil.copytree(w.model, work / "m")
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(changes)
        (m / "config.json").write_text(json.dumps(cfg))
        return ["generate", str(m), "--prompt", "hi", "--max-new-tokens", "2"]

    return build


def _generate(*flags):
    return lambda w, work: ["generate", str(w.model), "--prompt", "hi", "--max-new-tokens", "2", *flags]


def _resume(tamper):
    def build(w: World, work: Path) -> list[str]:
        run = copy_run(w.run, work / "run")
        tamper(run, newest_checkpoint(run))
        return resume_args(run)

    return build


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def _evil_optimizer(run, c):
    (c / "optimizer.pt").write_bytes(pickle.dumps(_Evil()))
    rewrite_checksums(c)


def _empty_rng(run, c):
    (c / "rng.pt").write_bytes(b"")
    rewrite_checksums(c)


def _state(edit):
    def tamper(run, c):
        state = json.loads((c / "state.json").read_text())
        edit(state)
        (c / "state.json").write_text(json.dumps(state))
        rewrite_checksums(c)

    return tamper


def _wrong_shape(run, c):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(c / "model.safetensors"), "pt") as st:
        tensors, meta = {k: st.get_tensor(k) for k in st.keys()}, st.metadata()
    tensors["norm.weight"] = tensors["norm.weight"][:-1].clone()
    save_file(tensors, str(c / "model.safetensors"), metadata=meta)
    rewrite_checksums(c)


def _edited_lr(run, c):
    cfg = json.loads((run / "train_config.json").read_text())
    cfg["lr"] = 0.5
    (run / "train_config.json").write_text(json.dumps(cfg))


def _humaneval_timeout(value):
    def build(w: World, work: Path) -> list[str]:
        samples = work / "samples.jsonl"
        samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
        return ["humaneval", "score", str(samples), "--allow-code-execution", "--timeout", value]

    return build


def _eval_rows(task: str, edit):
    """`slm eval` on one fixture task whose first row is edited by `edit`."""

    def build(w: World, work: Path) -> list[str]:
        data = work / "eval"
        src = w.eval_data / task / "validation.jsonl" if task == "hellaswag" else w.eval_data / task / "valid.jsonl"
        dst = data / task / src.name
        dst.parent.mkdir(parents=True)
        rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
        edit(rows[1])
        dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if task == "piqa":  # the original release: labels in their own file; use the HF layout instead
            dst.rename(dst.with_name("validation.jsonl"))
            labels = (w.eval_data / task / "valid-labels.lst").read_text().split()
            fixed = [json.loads(line) for line in dst.with_name("validation.jsonl").read_text().splitlines()]
            for r, lab in zip(fixed, labels):
                r.setdefault("label", int(lab))
            dst.with_name("validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed))
        return ["eval", str(w.model), "--tasks", task, "--data-dir", str(data), "--quiet"]

    return build


def _set(key, value):
    def edit(row):
        row[key] = value

    return edit


CASES = {
    # item 5: --out of export / import
    "export-out-foreign-dir": (lambda w, work: ["export", str(w.run), "--out", str(_notes_dir(work))],
                               "not a model directory slm wrote"),
    "export-out-file": (lambda w, work: ["export", str(w.run), "--out", str(_a_file(work))], "is not a directory"),
    "export-out-cwd": (lambda w, work: ["export", str(w.run), "--out", "."], "working directory"),
    "import-out-foreign-dir": (lambda w, work: ["import", str(w.gguf), "--out", str(_notes_dir(work))],
                               "not a model directory slm wrote"),
    "import-out-file": (lambda w, work: ["import", str(w.gguf), "--out", str(_a_file(work))], "is not a directory"),
    "import-out-cwd": (lambda w, work: ["import", str(w.gguf), "--out", "."], "working directory"),
    # item 6: data prepare
    "prepare-out-file": (lambda w, work: ["data", "prepare", "--source", f"text:{w.eval_data}", "--tokenizer",
                                          str(w.model), "--out", str(_a_file(work))], "is not a directory"),
    "prepare-missing-source": (lambda w, work: ["data", "prepare", "--source", f"text:{work / 'nope'}",
                                                "--tokenizer", str(w.model), "--out", str(work / "out")],
                               "no such file or directory"),
    # item 7: eval labels
    "eval-piqa-label-5": (_eval_rows("piqa", _set("label", 5)), "validation.jsonl:2: piqa: field 'label'"),
    "eval-piqa-label-minus-1": (_eval_rows("piqa", _set("label", -1)), "out of range"),
    "eval-piqa-label-float": (_eval_rows("piqa", _set("label", 1.7)), "label 1.7 is not an integer"),
    "eval-hellaswag-label-9": (_eval_rows("hellaswag", _set("label", "9")), "hellaswag: field 'label'"),
    "eval-hellaswag-no-endings": (_eval_rows("hellaswag", _set("endings", [])), "field 'endings'"),
    "eval-json-dir": (lambda w, work: ["eval", str(w.model), "--tasks", "piqa", "--data-dir", str(w.eval_data),
                                       "--json", str(work)], "is a directory"),
    # item 8: GGUF and config.json fields
    "gguf-head-count-0": (lambda w, work: ["import", str(w.gguf_heads0), "--out", str(work / "o")],
                          "head_count must be a positive integer"),
    "config-heads-0": (_config(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    "config-heads-str": (_config(num_attention_heads="9"), "num_attention_heads must be a positive integer"),
    "config-hidden-null": (_config(hidden_size=None), "hidden_size must be a positive integer"),
    "config-rope-theta-str": (_config(rope_theta="abc"), "rope_theta must be a finite number"),
    "config-eps-str": (_config(rms_norm_eps="tiny"), "rms_norm_eps must be a finite number"),
    "config-rope-parameters-list": (_config(rope_theta=None, rope_parameters=[1, 2]), "rope_parameters must be"),
    # item 9: values that gave silent garbage
    "gguf-eps-nan": (lambda w, work: ["import", str(w.gguf_nan_eps), "--out", str(work / "o")],
                     "layer_norm_rms_epsilon must be a finite number > 0"),
    "config-eps-negative": (_config(rms_norm_eps=-1), "rms_norm_eps must be a finite number > 0"),
    # item 8: sampling parameters
    "generate-seed-huge": (_generate("--seed", "99999999999999999999999"), "seed must be an integer"),
    "generate-temperature-tiny": (_generate("--temperature", "1e-320"), "temperature"),
    "generate-top-p-tiny": (_generate("--temperature", "1", "--top-p", "1e-300"), "top-p"),
    # item 8/9: resuming from a bad checkpoint
    "resume-malicious-optimizer": (_resume(_evil_optimizer), "optimizer.pt: refused"),
    "resume-empty-rng": (_resume(_empty_rng), "rng.pt: empty or truncated"),
    "resume-state-no-loader": (_resume(_state(lambda s: s.pop("loader"))), "field 'loader' is missing"),
    "resume-state-step-str": (_resume(_state(lambda s: s.update(step="75"))), "field 'step' must be int"),
    "resume-tensor-shape": (_resume(_wrong_shape), "tensor norm.weight has shape [63]"),
    "resume-edited-lr": (_resume(_edited_lr), "train_config.json: lr is 0.5"),
    # item 8: humaneval timeout
    "humaneval-timeout-nan": (_humaneval_timeout("nan"), "--timeout must be"),
    "humaneval-timeout-inf": (_humaneval_timeout("inf"), "--timeout must be"),
    "humaneval-timeout-huge": (_humaneval_timeout("1e300"), "--timeout must be"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, world, tmp_path, monkeypatch, capsys):
    build, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("SLM_CACHE", str(work / "cache"))
    argv = build(world, work)
    monkeypatch.chdir(work)
    before = snapshot(work)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("slm: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert snapshot(work) == before
    assert not Path("pwned").exists()
