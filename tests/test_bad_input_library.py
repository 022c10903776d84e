"""The bad-input checks live where the values are parsed, so library users get the same one-line
errors as the CLI (issue 13 items 7-9): config parsing, sampling parameters, seeds, timeouts, labels."""

from __future__ import annotations

import math

import pytest
import torch

from slm.config import ModelConfig, get_config
from slm.errors import SlmError
from slm.eval.humaneval import check_timeout
from slm.eval.tasks import FieldError, get_task, gold_index
from slm.sampling import SamplingParams, logits_to_probs, make_generator


def _hf(**changes):
    hf = get_config("tiny").to_hf()
    hf.update(changes)
    return hf


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_attention_heads": "9"}, "num_attention_heads must be a positive integer, got '9'"),
    ({"num_attention_heads": True}, "num_attention_heads must be a positive integer, got True"),
    ({"hidden_size": None}, "hidden_size must be a positive integer, got None"),
    ({"num_key_value_heads": 1.5}, "num_key_value_heads must be a positive integer"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number > 0, got 'abc'"),
    ({"rope_theta": None, "rope_parameters": [1]}, "rope_parameters must be an object"),
    ({"rope_theta": None, "rope_parameters": {"rope_theta": -5}}, "rope_theta must be a finite number > 0"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a finite number > 0, got 'tiny'"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a finite number > 0, got -1"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
    ({"hidden_size": 66}, "x.json: model config 'tiny': dim 66 is not divisible by n_heads 4"),
])  # fmt: skip
def test_config_json_fields_are_checked_at_parsing(changes, message):
    with pytest.raises(SlmError) as e:
        ModelConfig.from_hf(_hf(**changes), source="x.json")
    assert message in str(e.value) and str(e.value).startswith("x.json: ")


def test_model_config_itself_refuses_a_norm_eps_that_gives_garbage():
    for eps in (float("nan"), -1.0, 0.0, math.inf):
        with pytest.raises(SlmError, match="norm_eps must be a finite number > 0"):
            get_config("tiny", norm_eps=eps)


def test_nested_rope_theta_still_reads():
    assert ModelConfig.from_hf(_hf(rope_theta=None, rope_parameters={"rope_theta": 5e5})).rope_theta == 5e5


@pytest.mark.parametrize("kw, message", [
    ({"temperature": 1e-320}, "temperature 1e-320 is below"),
    ({"temperature": 1.0, "top_p": 1e-300}, "top-p 1e-300 is below the smallest float32"),
])  # fmt: skip
def test_sampling_params_refuse_values_that_make_nan(kw, message):
    with pytest.raises(SlmError, match=message):
        SamplingParams(**kw)


def test_tiny_top_p_keeps_the_top_token():
    """The smallest accepted top-p keeps exactly the most likely token (no all -inf row, no NaN)."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=torch.finfo(torch.float32).tiny))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_seed_range():
    assert make_generator(2**64 - 1).initial_seed() == 2**64 - 1
    for bad in (2**64, 99999999999999999999999, -(2**63) - 1, 1.5, True):
        with pytest.raises(SlmError, match="seed must be an integer"):
            make_generator(bad)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e300, 0, -1, "3"])
def test_humaneval_timeout_is_bounded(value):
    with pytest.raises(SlmError, match="--timeout must be"):
        check_timeout(value)
    check_timeout(3.0)


@pytest.mark.parametrize("value, n, ok", [
    (1, 2, 1), ("3", 4, 3), (5, 2, None), (-1, 2, None), ("9", 4, None), (1.7, 2, None), (1.0, 2, None),
    (True, 2, None), (None, 2, None), ("x", 4, None),
])  # fmt: skip
def test_gold_labels_are_integers_in_range(value, n, ok):
    if ok is None:
        with pytest.raises(FieldError, match="field 'label'"):
            gold_index(value, n, "label")
    else:
        assert gold_index(value, n, "label") == ok


def test_hellaswag_without_endings_names_the_field():
    doc = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": [], "label": "0"}
    with pytest.raises(FieldError, match="field 'endings'"):
        get_task("hellaswag").to_item(doc)
