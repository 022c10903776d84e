"""The zero-shot tasks of the AMD-135M table, defined exactly as lm-evaluation-harness 0.4 defines them.

Each task turns one dataset row into an `Item`: the (context, continuation) log-likelihood
requests lm_eval would issue and the gold answer. The rules copied from lm_eval's task YAMLs
(`lm_eval/tasks/<task>/`): the prompt templates, the choices, target delimiter " " prepended to
every continuation, WinoGrande's "partial" scoring (the option goes into the context, the shared
rest of the sentence is the continuation), HellaSwag's text cleanup, LAMBADA's last word.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from slm.errors import SlmError
from slm.eval.data import DatasetSpec

TARGET_DELIMITER = " "  # lm_eval's default `target_delimiter`


@dataclass(frozen=True)
class Request:
    """Score log P(continuation | context)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    requests: tuple[Request, ...]  # one per choice (multiple choice), or one (loglikelihood tasks)
    gold: int  # index of the right request (0 for loglikelihood tasks)
    choices: tuple[str, ...]  # what lm_eval measures in characters for acc_norm (without the delimiter)


@dataclass(frozen=True)
class Task:
    name: str
    dataset: DatasetSpec
    output_type: str  # "multiple_choice" or "loglikelihood", as in lm_eval
    metrics: tuple[str, ...]
    to_item: Callable[[dict], Item]


class FieldError(SlmError):
    """A dataset row whose field is not what the task needs; `build_items` adds the file and line."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def gold_index(value, n_choices: int, field: str) -> int:
    """A gold label as an index into the choices: an integer (or a string of digits, as HellaSwag
    stores it) in [0, n_choices). A float (1.7) or an out-of-range label would score the item wrong."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"label {value!r} is not an integer")
    if not 0 <= value < n_choices:
        raise FieldError(field, f"label {value} is out of range for {n_choices} choices (0..{n_choices - 1})")
    return value


def _multiple_choice(context: str, choices: list[str], gold: int) -> Item:
    if not choices:
        raise FieldError("choices", "no answer choices")
    requests = tuple(Request(context, TARGET_DELIMITER + c) for c in choices)
    return Item(requests, gold, tuple(choices))


# --- the tasks ---------------------------------------------------------------------------


def sciq_item(doc: dict) -> Item:
    support = doc["support"]
    context = f"{support.lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _multiple_choice(context, choices, 3)


def piqa_item(doc: dict) -> Item:
    context = f"Question: {doc['goal']}\nAnswer:"
    return _multiple_choice(context, [doc["sol1"], doc["sol2"]], gold_index(doc["label"], 2, "label"))


def arc_item(doc: dict) -> Item:
    choices = doc["choices"]
    labels = list(choices["label"])
    key = doc["answerKey"]
    if key not in labels:
        raise SlmError(f"arc: answerKey {key!r} is not one of the choice labels {labels} (id {doc.get('id')})")
    return _multiple_choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]), labels.index(key))


def hellaswag_preprocess(text: str) -> str:
    """lm_eval's hellaswag `preprocess`: strip, drop WikiHow's [title]/[step] artifacts, squeeze double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    context = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    if not isinstance(doc["endings"], list) or not doc["endings"]:
        raise FieldError("endings", f"expected a non-empty list of endings, got {doc['endings']!r}")
    choices = [hellaswag_preprocess(e) for e in doc["endings"]]
    if doc["label"] in ("", None):  # the test split has no labels
        raise FieldError("label", "no label (the test split has none; use the validation split)")
    return _multiple_choice(context, choices, gold_index(doc["label"], len(choices), "label"))


def winogrande_item(doc: dict) -> Item:
    # Partial scoring: each option completes the sentence up to the blank (the context); the
    # likelihood of the rest of the sentence (the continuation, same for both) decides.
    sentence = doc["sentence"]
    idx = sentence.find("_")
    if idx < 0:
        raise SlmError(f"winogrande: sentence has no blank '_': {sentence!r}")
    contexts = [sentence[:idx] + opt for opt in (doc["option1"], doc["option2"])]
    continuation = TARGET_DELIMITER + sentence[idx + 1 :].strip()
    answer = str(doc["answer"])
    if answer not in ("1", "2"):
        raise SlmError(f"winogrande: answer {answer!r} is not '1' or '2' (the test split has no answers)")
    return Item(tuple(Request(c, continuation) for c in contexts), int(answer) - 1, tuple(contexts))


def lambada_item(doc: dict) -> Item:
    words = doc["text"].split(" ")
    return Item((Request(" ".join(words[:-1]), " " + words[-1]),), 0, ())


_MC = ("acc", "acc_norm")
_PIQA_ORIGINAL = (("valid.jsonl", "valid-labels.lst"), ("dev.jsonl", "dev-labels.lst"))

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sciq", DatasetSpec("allenai/sciq", None, "test"), "multiple_choice", _MC, sciq_item),
        Task("winogrande", DatasetSpec("allenai/winogrande", "winogrande_xl", "validation"), "multiple_choice",
             ("acc",), winogrande_item),
        Task("piqa", DatasetSpec("baber/piqa", None, "validation", _PIQA_ORIGINAL), "multiple_choice", _MC,
             piqa_item),
        Task("arc_easy", DatasetSpec("allenai/ai2_arc", "ARC-Easy", "test"), "multiple_choice", _MC, arc_item),
        Task("arc_challenge", DatasetSpec("allenai/ai2_arc", "ARC-Challenge", "test"), "multiple_choice", _MC,
             arc_item),
        Task("hellaswag", DatasetSpec("Rowan/hellaswag", None, "validation"), "multiple_choice", _MC,
             hellaswag_item),
        Task("lambada_openai", DatasetSpec("EleutherAI/lambada_openai", "default", "test"), "loglikelihood",
             ("perplexity", "acc"), lambada_item),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise SlmError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


# --- per-item metrics (lm_eval's ConfigurableTask.process_results) ------------------------


def score_item(task: Task, item: Item, results: list[tuple[float, bool]]) -> dict[str, float]:
    """results: (log-likelihood, continuation is the greedy one) per request of `item`."""
    if task.output_type == "loglikelihood":
        ll, is_greedy = results[0]
        return {"perplexity": ll, "acc": float(is_greedy)}
    lls = np.array([ll for ll, _ in results])
    lengths = np.array([float(len(c)) for c in item.choices])
    scores = {"acc": 1.0 if int(np.argmax(lls)) == item.gold else 0.0}  # argmax: the first of ties, as lm_eval
    if "acc_norm" in task.metrics:
        scores["acc_norm"] = 1.0 if int(np.argmax(lls / lengths)) == item.gold else 0.0
    return scores
