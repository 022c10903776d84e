"""slm eval against lm-evaluation-harness itself (PyPI lm_eval, HF backend), on a small random model
and fixtures in each official format: per-item log-likelihoods within 1e-4, identical accuracies,
the same aggregate metrics and standard errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from eval_helpers import FIXTURES, make_model_dir

pytest.importorskip("lm_eval")

TASKS = ["sciq", "winogrande", "piqa", "arc_easy", "arc_challenge", "hellaswag", "lambada_openai"]
BOOTSTRAP_ITERS = 2000  # lm_eval's default is 100000; the draws are the same, only fewer

# Copies of lm_eval 0.4's own task YAMLs (lm_eval/tasks/<task>/), pointed at local jsonl files.
_YAML = {
    "sciq": """
output_type: multiple_choice
doc_to_text: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"
doc_to_target: 3
doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true},
              {metric: acc_norm, aggregation: mean, higher_is_better: true}]
""",
    "winogrande": """
output_type: multiple_choice
doc_to_text: !function lm_eval.tasks.winogrande.preprocess_winogrande.doc_to_text
doc_to_target: !function lm_eval.tasks.winogrande.preprocess_winogrande.doc_to_target
doc_to_choice: !function lm_eval.tasks.winogrande.preprocess_winogrande.doc_to_choice
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
""",
    "piqa": """
output_type: multiple_choice
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true},
              {metric: acc_norm, aggregation: mean, higher_is_better: true}]
""",
    "arc_easy": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true},
              {metric: acc_norm, aggregation: mean, higher_is_better: true}]
""",
    "hellaswag": """
output_type: multiple_choice
process_docs: !function lm_eval.tasks.hellaswag.utils.process_docs
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true},
              {metric: acc_norm, aggregation: mean, higher_is_better: true}]
""",
    "lambada_openai": """
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false},
              {metric: acc, aggregation: mean, higher_is_better: true}]
""",
}
_YAML["arc_challenge"] = _YAML["arc_easy"]


def _piqa_rows() -> list[dict]:
    docs = [json.loads(x) for x in (FIXTURES / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = (FIXTURES / "piqa" / "valid-labels.lst").read_text().split()
    return [{**d, "label": int(label)} for d, label in zip(docs, labels)]


def _fixture_file(task: str) -> Path:
    return next(p for p in (FIXTURES / task).glob("*.jsonl"))


def _write_lm_eval_tasks(root: Path) -> Path:
    include = root / "lm_eval_tasks"
    include.mkdir()
    for task, body in _YAML.items():
        data = _fixture_file(task)
        if task == "piqa":  # lm_eval reads the HF layout (label inside each row)
            data = root / "piqa_hf.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in _piqa_rows()))
        head = (f"task: slmtest_{task}\ndataset_path: json\ndataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
                "training_split: null\nvalidation_split: validation\ntest_split: null\n")
        (include / f"slmtest_{task}.yaml").write_text(head + body)
    return include


def _write_slm_data_dir(root: Path) -> Path:
    """The same documents in each format slm reads: jsonl, HF parquet shards in both layouts, PIQA's original."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "data"
    for task in ("sciq", "winogrande", "arc_easy", "lambada_openai"):
        (data / task).mkdir(parents=True)
        shutil.copy(_fixture_file(task), data / task / _fixture_file(task).name)
    shutil.copytree(FIXTURES / "piqa", data / "piqa")  # valid.jsonl + valid-labels.lst

    def parquet(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([json.loads(x) for x in src.read_text().splitlines()]), dst)

    parquet(_fixture_file("arc_challenge"), data / "ai2_arc" / "ARC-Challenge" / "test-00000-of-00001.parquet")
    parquet(_fixture_file("hellaswag"), data / "hellaswag" / "data" / "validation-00000-of-00001.parquet")
    return data


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Run lm_eval once over all tasks and slm once; both results."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      DISABLE_MULTIPROC="1")
    root = tmp_path_factory.mktemp("eval_vs_lm_eval")
    model_dir = make_model_dir(root)
    include = _write_lm_eval_tasks(root)
    data_dir = _write_slm_data_dir(root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets_cache")

    import lm_eval
    from lm_eval.tasks import TaskManager

    ref = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu", batch_size=4,
        tasks=[f"slmtest_{t}" for t in TASKS], task_manager=TaskManager(include_path=str(include)),
        log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
    )
    from slm.eval.run import evaluate

    ours = {r.task: r for r in evaluate(model_dir, TASKS, data_dir=data_dir, batch_size=3,
                                        bootstrap_iters=BOOTSTRAP_ITERS)}
    return ref, ours


@pytest.mark.parametrize("task", TASKS)
def test_per_item_loglikelihoods_and_scores_match_lm_eval(compared, task):
    ref, ours = compared
    samples = sorted(ref["samples"][f"slmtest_{task}"], key=lambda s: s["doc_id"])
    mine = ours[task].samples
    assert len(samples) == len(mine) > 0
    for s, m in zip(samples, mine):
        ref_lls = [float(r[0][0]) for r in s["resps"]]
        ref_greedy = [bool(r[0][1]) for r in s["resps"]]
        assert m["loglikelihoods"] == pytest.approx(ref_lls, abs=1e-4), (task, s["doc_id"])
        assert m["is_greedy"] == ref_greedy, (task, s["doc_id"])
        for metric in ("acc", "acc_norm"):
            if metric in s:
                assert m[metric] == s[metric], (task, s["doc_id"], metric)
        if task == "lambada_openai":
            assert m["perplexity"] == pytest.approx(float(s["perplexity"]), abs=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_aggregates_and_stderrs_match_lm_eval(compared, task):
    ref, ours = compared
    res = ref["results"][f"slmtest_{task}"]
    mine = ours[task]
    for metric, value in mine.metrics.items():
        assert value == pytest.approx(res[f"{metric},none"], rel=1e-4), metric
        assert mine.stderrs[metric] == pytest.approx(res[f"{metric}_stderr,none"], rel=1e-3), metric
