"""Task definitions, dataset files in each official layout, metric aggregation, and `slm eval`."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest

from eval_helpers import FIXTURES, make_model_dir
from slm.cli import main
from slm.errors import SlmError
from slm.eval.data import load_documents
from slm.eval.metrics import aggregate, mean_stderr, perplexity_stderr
from slm.eval.tasks import TASKS, get_task, hellaswag_preprocess, score_item


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_layout_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = get_task("arc_challenge").dataset
    rows = _rows(FIXTURES / "arc_challenge" / "test.jsonl")
    layouts = {
        "arc_challenge/test.jsonl": None,
        "arc_challenge/test.parquet": None,
        "arc_challenge/data/test-00000-of-00002.parquet": "arc_challenge/data/test-00001-of-00002.parquet",
        "ai2_arc/ARC-Challenge/test-00000-of-00001.parquet": None,
    }
    for i, (first, second) in enumerate(layouts.items()):
        root = tmp_path / str(i)
        parts = [(first, rows)] if second is None else [(first, rows[:1]), (second, rows[1:])]
        for name, part in parts:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".jsonl"):
                (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
            else:
                pq.write_table(pa.Table.from_pylist(part), root / name)
        docs, source = load_documents("arc_challenge", spec, root)
        assert docs == rows, first
        assert first.split("/")[-1] in source
        for limit in (1, 2, len(rows) + 1):  # --limit reads only the first rows, across shards too
            assert load_documents("arc_challenge", spec, root, limit)[0] == rows[:limit], (first, limit)


def test_piqa_original_release_format():
    docs, _ = load_documents("piqa", get_task("piqa").dataset, FIXTURES)
    labels = (FIXTURES / "piqa" / "valid-labels.lst").read_text().split()
    assert [d["label"] for d in docs] == [int(x) for x in labels]
    assert docs[1]["goal"] == "dresser"
    assert load_documents("piqa", get_task("piqa").dataset, FIXTURES, limit=2)[0] == docs[:2]


def test_missing_data_says_which_files_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "no_cache"))
    with pytest.raises(SlmError, match=r"sciq: put test.jsonl or test.parquet .*allenai/sciq.* in .*/sciq/"):
        load_documents("sciq", get_task("sciq").dataset, tmp_path)
    with pytest.raises(SlmError, match=r"valid.jsonl \+ valid-labels.lst"):
        load_documents("piqa", get_task("piqa").dataset, tmp_path)
    (tmp_path / "piqa").mkdir()
    shutil.copy(FIXTURES / "piqa" / "valid.jsonl", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(SlmError, match="2 labels for 5 documents"):
        load_documents("piqa", get_task("piqa").dataset, tmp_path)
    with pytest.raises(SlmError, match="2 labels for 5 documents"):  # the whole files, not the first 2 rows
        load_documents("piqa", get_task("piqa").dataset, tmp_path, limit=2)
    with pytest.raises(SlmError, match="unknown task 'mmlu'"):
        get_task("mmlu")


def test_task_items_follow_lm_eval_templates():
    wino = get_task("winogrande").to_item(_rows(FIXTURES / "winogrande" / "validation.jsonl")[0])
    assert [r.context for r in wino.requests] == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert {r.continuation for r in wino.requests} == {" always got the harder cases."}
    assert wino.gold == 0
    sciq = get_task("sciq").to_item(_rows(FIXTURES / "sciq" / "test.jsonl")[1])  # empty support
    assert sciq.requests[0].context.startswith("\nQuestion: What phenomenon")
    assert sciq.requests[3].continuation == " coriolis effect" and sciq.gold == 3
    arc = get_task("arc_easy").to_item(_rows(FIXTURES / "arc_easy" / "test.jsonl")[1])  # numeric labels
    assert arc.gold == 3 and arc.requests[3].continuation == " an iron nail"
    lam = get_task("lambada_openai").to_item({"text": "the old dog slept until the  morning"})
    assert lam.requests[0].context == "the old dog slept until the " and lam.requests[0].continuation == " morning"


def test_hellaswag_preprocess_matches_lm_eval():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    texts = [" [header] How to dye [title] Find the color.  [step] Many brands.", "A man [substeps] sits  down ",
             "no brackets", "[title] Choose a brand.  [step] Some brands are cheaper than others."]
    texts += [e for row in _rows(FIXTURES / "hellaswag" / "validation.jsonl") for e in row["endings"] + [row["ctx"]]]
    for t in texts:
        assert hellaswag_preprocess(t) == utils.preprocess(t), t


def test_acc_norm_divides_by_characters_and_ties_pick_the_first():
    task = get_task("piqa")
    item = task.to_item({"goal": "g", "sol1": "ab", "sol2": "abcdef", "label": 1})
    # -4/3 chars vs -6/7 chars (the delimiter is not counted): acc picks 0, acc_norm picks 1.
    assert score_item(task, item, [(-4.0, False), (-6.0, False)]) == {"acc": 0.0, "acc_norm": 1.0}
    assert score_item(task, item, [(-3.0, False), (-3.0, False)])["acc"] == 0.0


def test_aggregates_match_lm_eval_metrics(monkeypatch):
    metrics = pytest.importorskip("lm_eval.api.metrics")
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    rng = random.Random(0)
    lls = [-rng.random() * 8 for _ in range(23)]
    accs = [float(rng.random() < 0.4) for _ in range(23)]
    assert mean_stderr(accs) == pytest.approx(metrics.mean_stderr(accs), rel=1e-12)
    assert perplexity_stderr(lls, 2000) == pytest.approx(metrics.bootstrap_stderr(metrics.perplexity, lls, 2000),
                                                         rel=1e-9)
    value, err = aggregate("perplexity", lls, 1000)
    assert value == pytest.approx(math.exp(-sum(lls) / len(lls))) and err > 0
    assert aggregate("acc", [1.0], 1000) == (1.0, None)


def test_all_tasks_registered():
    assert set(TASKS) == {"sciq", "winogrande", "piqa", "arc_easy", "arc_challenge", "hellaswag", "lambada_openai"}


def test_cli_eval_prints_table_and_writes_json(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path)
    out = tmp_path / "res" / "eval.json"
    code = main(["eval", str(model_dir), "--tasks", "piqa,lambada_openai", "--data-dir", str(FIXTURES),
                 "--limit", "3", "--batch-size", "2", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "piqa" in table and "acc_norm" in table and "perplexity" in table
    res = json.loads(out.read_text())
    assert res["results"]["piqa"]["n_items"] == 3
    assert set(res["results"]["lambada_openai"]) >= {"perplexity", "perplexity_stderr", "acc", "acc_stderr"}
    assert len(res["samples"]["piqa"][0]["loglikelihoods"]) == 2
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind


def test_cli_eval_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "no_cache"))
    assert main(["eval", str(tmp_path), "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2
    assert "validation.jsonl or validation.parquet" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_rows_in_a_foreign_format_are_named(tmp_path):
    from slm.eval.run import build_items

    (tmp_path / "sciq").mkdir()
    (tmp_path / "sciq" / "test.jsonl").write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(SlmError, match=r"sciq: document 1 of .*test.jsonl is not in the allenai/sciq format"):
        build_items("sciq", tmp_path, None)
