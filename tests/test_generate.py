"""Generation: greedy output equals transformers.generate; stopping rules; bad input."""

from __future__ import annotations

import pytest
import torch

from slm.errors import SlmError
from slm.generate import Stop, generate
from slm.load import load_model
from slm.sampling import SamplingParams
from slm.tokenizer import Tokenizer

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


def test_stops_at_stop_token_and_callback(models, tiny_model_dir):
    ours, _ = models
    prompt = [5, 6, 7, 8]
    free = generate(ours, prompt, max_new_tokens=12).tokens
    stop = free[4]
    result = generate(ours, prompt, max_new_tokens=12, stop=Stop((stop,)))
    assert result.tokens == free[: free.index(stop) + 1]
    assert result.stop_reason == "eos"
    # A stop string: generation ends at the first token whose text completes it.
    tok = Tokenizer.load(tiny_model_dir)
    text = tok.decode(free)
    end = next(i for i in range(1, len(free) + 1) if tok.decode(free[:i]).strip())  # the first visible text
    target = tok.decode(free[:end]).strip()[-1]
    seen = []
    result = generate(ours, prompt, max_new_tokens=12, stop=Stop(strings=(target,), tokenizer=tok),
                      on_token=lambda t, from_draft: seen.append((t, from_draft)))
    assert result.stop_reason == "stop" and result.tokens == free[:end] and target in text
    assert seen == [(t, False) for t in result.tokens]  # every token streamed, none from a draft


def test_context_limit(models):
    ours, _ = models
    ctx = ours.config.max_seq_len
    result = generate(ours, [3] * (ctx - 4), max_new_tokens=50, stop=Stop())
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
    a = generate(ours, [5, 6], 20, params, stop=Stop(), generator=torch.Generator().manual_seed(1)).tokens
    b = generate(ours, [5, 6], 20, params, stop=Stop(), generator=torch.Generator().manual_seed(1)).tokens
    c = generate(ours, [5, 6], 20, params, stop=Stop(), generator=torch.Generator().manual_seed(2)).tokens
    assert a == b and a != c


def test_resuming_from_a_cached_prefix_scores_only_the_rest(models):
    """`cached=N`: a continuation whose first N tokens an earlier call left in the cache gives the
    output of scoring everything again, and only the rest is scored (the cache is what it reads:
    corrupting the skipped positions changes the output)."""
    ours, hf = models
    prompt = [5, 6, 7, 8, 9, 10]
    first = generate(ours, prompt, max_new_tokens=10, stop=Stop()).tokens
    # Resume after the first 4 new tokens: prompt + 4 tokens, of which all but the last are cached.
    context = prompt + first[:4]
    resumed = generate(ours, context, max_new_tokens=6, stop=Stop(), cached=len(context) - 1).tokens
    assert resumed == first[4:]
    again = generate(ours, context, max_new_tokens=6, stop=Stop()).tokens
    assert again == first[4:]
    # The skipped positions really are read from the cache, not recomputed.
    generate(ours, context, max_new_tokens=1, stop=Stop())  # cache context[:-1] again
    with torch.inference_mode():  # the cache was made inside generate's inference mode
        for layer in ours.layers:
            layer.attention.kv_cache.k[:, :, : len(context) - 1].normal_(generator=torch.Generator().manual_seed(0))
    corrupted = generate(ours, context, max_new_tokens=6, stop=Stop(), cached=len(context) - 1).tokens
    assert corrupted != first[4:]


def test_bad_cached_prefix(models):
    ours, hf = models
    for bad in (-1, 3, True, 1.5):
        with pytest.raises(SlmError, match="cached must be an int in \\[0, 2\\]"):
            generate(ours, [5, 6, 7], max_new_tokens=2, cached=bad)
    with pytest.raises(SlmError, match="needs an slm Transformer"):
        generate(hf, [5, 6, 7], max_new_tokens=2, cached=1)
