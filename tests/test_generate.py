"""Generation: greedy output equals transformers.generate; stopping rules; bad input."""

from __future__ import annotations

import pytest
import torch

from slm.errors import SlmError
from slm.generate import generate
from slm.sampling import SamplingParams
from slm.weights import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return load_model(tiny_model_dir), hf


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_transformers_generate(models, seed):
    ours, hf = models
    prompt = torch.randint(3, ours.config.vocab_size, (5 + 7 * seed,), generator=torch.Generator().manual_seed(seed))
    result = generate(ours, prompt.tolist(), max_new_tokens=30)
    with torch.no_grad():
        ref = hf.generate(prompt[None], do_sample=False, max_new_tokens=30, pad_token_id=0)[0, len(prompt) :]
    assert result.tokens == ref.tolist()
    assert result.prompt_tokens == len(prompt)


def test_stops_at_stop_token_and_callback(models):
    ours, _ = models
    prompt = [5, 6, 7, 8]
    free = generate(ours, prompt, max_new_tokens=12).tokens
    stop = free[4]
    result = generate(ours, prompt, max_new_tokens=12, stop_ids=[stop])
    assert result.tokens == free[: free.index(stop) + 1]
    assert result.stop_reason == "eos"
    seen = []
    result = generate(ours, prompt, max_new_tokens=12, stop_ids=[], on_token=seen.append,
                      should_stop=lambda toks: len(toks) == 3)
    assert seen == result.tokens == free[:3] and result.stop_reason == "stop"


def test_context_limit(models):
    ours, _ = models
    ctx = ours.config.max_seq_len
    result = generate(ours, [3] * (ctx - 4), max_new_tokens=50, stop_ids=[])
    assert result.new_tokens == 4 and result.stop_reason == "context"
    with pytest.raises(SlmError, match=f"prompt has {ctx} tokens, but the model's context is {ctx}"):
        generate(ours, [3] * ctx, max_new_tokens=1)


def test_bad_prompts(models):
    ours, _ = models
    with pytest.raises(SlmError, match="empty"):
        generate(ours, [], max_new_tokens=1)
    with pytest.raises(SlmError, match="outside the model's vocabulary"):
        generate(ours, [1, ours.config.vocab_size], max_new_tokens=1)
    with pytest.raises(SlmError, match="max-new-tokens"):
        generate(ours, [1], max_new_tokens=-1)


def test_sampling_is_seeded(models):
    ours, _ = models
    params = SamplingParams(temperature=1.0, top_k=50)
    a = generate(ours, [5, 6], 20, params, stop_ids=[], generator=torch.Generator().manual_seed(1)).tokens
    b = generate(ours, [5, 6], 20, params, stop_ids=[], generator=torch.Generator().manual_seed(1)).tokens
    c = generate(ours, [5, 6], 20, params, stop_ids=[], generator=torch.Generator().manual_seed(2)).tokens
    assert a == b and a != c
