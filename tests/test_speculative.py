"""Speculative decoding, greedy: token-for-token the target's own greedy output, whatever the draft
(always right, always wrong, unrelated, prompt lookup, a smaller vocabulary, a transformers model),
for many prompts and K; plus the schedule, the draft loader and the CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from conftest import make_model_dir, make_tokenizer_dir, randomize
from slm.config import get_config
from slm.errors import SlmError
from slm.generate import Stop, generate
from slm.load import load_draft
from slm.model import Transformer
from slm.sampling import SamplingParams
from slm.speculative import (
    HFLM, AdaptiveK, HybridDraft, ModelDraft, NgramDraft, Offer, Plan, Round, SlmLM, as_lm, parse_draft_tokens,
)

KS = [0, 1, 2, 3, 5, 8, "auto"]


# Tiny models run fastest on one thread, and far more predictably on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int, **overrides) -> Transformer:
    return randomize(Transformer(get_config("tiny", **overrides)), seed).eval()


@pytest.fixture(scope="module")
def target():
    return _tiny(0)


@pytest.fixture(scope="module")
def drafts(target):
    wrong = _tiny(0)
    with torch.no_grad():  # the target with negated logits: its argmax is the target's argmin, never its argmax
        wrong.output.weight.neg_()
    other = _tiny(1, n_layers=1)
    hybrid = HybridDraft(NgramDraft(min_ngram=2), ModelDraft(as_lm(other), target.config.vocab_size))
    return {"right": target, "wrong": wrong, "other": other, "ngram": NgramDraft(), "hybrid": hybrid}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 5, 9, 20, 33]
    out = [torch.randint(3, 256, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]
    out.append([7, 8, 9, 10, 7, 8, 9, 10, 7, 8])  # repetitive: prompt lookup finds matches
    return out


@pytest.mark.parametrize("kind", ["right", "wrong", "other", "ngram", "hybrid"])
def test_greedy_equals_target_greedy(target, drafts, kind):
    draft = drafts[kind]
    for prompt in _prompts(6):
        ref = generate(target, prompt, 24, stop=Stop()).tokens
        for k in KS:
            r = generate(target, prompt, 24, draft=draft, draft_tokens=k, stop=Stop())
            assert r.tokens == ref, (kind, prompt, k)
            assert r.stop_reason == "length"
            s = r.stats
            if k == 0:  # the prefill gives the first token, each round one more
                assert s["draft_n"] == 0 and s["rounds"] == 23
            if kind == "right" and s["draft_n"]:
                assert s["acceptance_rate"] == 1.0
            if kind == "wrong":
                assert s["draft_n_accepted"] == 0 and s["rounds"] == 23
            assert s["rounds"] * s["tokens_per_round"] == pytest.approx(23)


def test_full_accept_rounds_and_counters(target):
    seen = []
    r = generate(target, [5, 6, 7], 18, draft=target, draft_tokens=4, stop=Stop(),
                 on_token=lambda t, from_draft: seen.append((t, from_draft)))
    # The prefill gives token 1; 3 rounds of 4 drafts + 1 target token; the last round may draft
    # only 1 (18 - 16 - 1).
    assert [t for t, _ in seen] == r.tokens
    assert [d for _, d in seen] == [False] + ([True] * 4 + [False]) * 3 + [True, False]
    assert r.stats["accepted_per_pos"] == [4, 3, 3, 3]
    assert r.stats["rounds"] == 4
    assert r.stats["draft_n"] == 4 + 4 + 4 + 1 and r.stats["draft_n_accepted"] == 13
    assert r.stats["mean_accepted"] == 13 / 4 and r.stats["tokens_per_round"] == 17 / 4
    assert r.stats["draft_forwards"] == 13  # one per drafted token: the cache catch-up rides along


def test_stop_token_and_context_limit(target, drafts):
    prompt = [11, 12, 13]
    ref = generate(target, prompt, 30, stop=Stop()).tokens
    stop = ref[9]
    want = generate(target, prompt, 30, stop=Stop((stop,)))
    for k in (3, "auto"):
        r = generate(target, prompt, 30, draft=drafts["right"], draft_tokens=k, stop=Stop((stop,)))
        assert r.tokens == want.tokens and r.stop_reason == "eos"
    long_prompt = list(range(3, 3 + 120))  # context 128: only 8 tokens fit
    want = generate(target, long_prompt, 30, stop=Stop())
    r = generate(target, long_prompt, 30, draft=drafts["right"], draft_tokens=5, stop=Stop())
    assert r.tokens == want.tokens and len(r.tokens) == 8 and r.stop_reason == "context"
    two = generate(target, [4], 5, stop=Stop()).tokens[:2]
    tok = _Spelled()
    stop = Stop(strings=(tok.decode(two),), tokenizer=tok)  # the text of the first two tokens
    r = generate(target, [4], 5, draft=drafts["right"], draft_tokens=3, stop=stop)
    assert r.stop_reason == "stop" and r.tokens == two


class _Spelled:
    """A tokenizer for tests: id i decodes to "<i>"."""

    eos_id = None

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_draft_vocabulary_prefix_of_targets(target):
    small = _tiny(3, vocab_size=200)  # AMD's case: the draft lacks the target's last ids
    same_as_target = Transformer(get_config("tiny", vocab_size=200)).eval()
    with torch.no_grad():  # the target's network truncated to 200 ids: agrees whenever the target's argmax < 200
        for name, p in same_as_target.named_parameters():
            src = dict(target.named_parameters())[name]
            p.copy_(src[:200] if name in ("tok_embeddings.weight", "output.weight") else src)
    for prompt in _prompts(4, seed=1):
        ref = generate(target, prompt, 16, stop=Stop()).tokens
        for draft in (small, same_as_target):
            for k in (2, "auto"):
                assert generate(target, prompt, 16, draft=draft, draft_tokens=k, stop=Stop()).tokens == ref
    g = torch.Generator().manual_seed(0)
    r = generate(target, [3, 4], 16, SamplingParams(temperature=1.0), draft=small, draft_tokens=3, generator=g)
    assert all(0 <= t < 256 for t in r.tokens)


def test_model_draft_feeds_missing_tokens(target):
    """After a full accept the draft's cache lacks the last draft token and the bonus token: both are fed."""
    calls = []
    lm = SlmLM(target)
    forward = lm.forward
    lm.forward = lambda tokens, start, last_only=False: calls.append((len(tokens), start)) or forward(tokens, start, last_only)
    generate(target, [5, 6, 7], 11, draft=ModelDraft(lm, 256), draft_tokens=4, stop=Stop())
    # the target's prefill gave token t1 (context of 4); round 1: the context at 0..3, then d1..d3
    # at 4..6; round 2 starts with d4 + the bonus token at 7, 8
    assert calls[:4] == [(4, 0), (1, 4), (1, 5), (1, 6)]
    assert calls[4] == (2, 7)


def _lookup(d: NgramDraft, context: list[int], k: int) -> list[int]:
    offers = d.offers(context)
    return d.propose(context, Plan(offers[0], k), SamplingParams()).tokens if offers else []


def test_ngram_draft_proposes_continuation():
    d = NgramDraft(max_ngram=3)
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert d.offers(ctx)[0].evidence == 3
    assert _lookup(d, ctx, 3) == [4, 5, 9]
    assert _lookup(NgramDraft(), [1, 2, 3], 3) == []  # no earlier occurrence
    assert _lookup(NgramDraft(), [7, 1, 2, 8, 1, 2, 9, 1, 2], 2) == [9, 1]  # latest match wins


# --- the schedule, driven through its protocol: plan a round for an offer, then record it -------


def _plan(s, evidence: int = 0, catchup: int = 0) -> Plan:
    return s.plan([Offer(None, evidence, catchup)], cap=1 << 30)


def _record(s, plan: Plan, accepted: int, step_s, verify_s: float, catchup_tokens: int = 0, catchup_s: float = 0.0):
    s.record(Round(plan, plan.k, accepted, step_s, plan.k + 1, verify_s, catchup_tokens, catchup_s))


def test_adaptive_k_backs_off_and_probes():
    s = AdaptiveK(k_start=4)
    # A useless draft as costly as half a target step: K must fall to 0 (plain decoding) ...
    ks = []
    for _ in range(600):
        p = _plan(s)
        k = p.k
        _record(s, p, 0, 0.5 if k else None, 1.0 + 0.05 * k)
        ks.append(k)
    assert ks[19] == 0 and s.k == 0
    # ... and probe with k_start tokens at growing intervals: a handful of probes in 580 rounds.
    probes = [i for i in range(20, 600) if ks[i] > 0]
    assert 3 <= len(probes) <= 8 and set(ks[20:]) == {0, s.k_start}
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps)
    # A perfect, cheap draft: K grows large.
    s = AdaptiveK(k_start=2)
    for _ in range(30):
        p = _plan(s)
        _record(s, p, p.k, 0.05, 1.0 + 0.02 * p.k)
    assert s.k >= 10


def test_adaptive_k_is_not_priced_out_by_one_stalled_step():
    """A draft that pays (all accepted, 0.4 of a step per token: the int4 self-draft's kind) whose
    third round's draft step and verify forward stall for 20x their time (the host preempted the
    thread): it keeps drafting (a plain moving average priced it at 1.5 steps a token: K = 0 until a
    probe, 16+ rounds later), and its cost estimate is back within 10% after a few rounds. A
    slowdown that lasts is still followed."""
    s = AdaptiveK(k_start=2)
    ks = []
    for i in range(12):
        p = _plan(s)
        stall = 20.0 if i == 2 else 1.0
        _record(s, p, p.k, 0.4 * stall if p.k else None, (1.0 + 0.02 * p.k) * stall)
        ks.append(p.k)
    assert all(k > 0 for k in ks[1:]), ks
    assert s.evidence[0].draft_s == pytest.approx(0.4, rel=0.1)
    for _ in range(40):  # the host is now 3x slower for good
        p = _plan(s)
        _record(s, p, p.k, 1.2, 3.0 * (1.0 + 0.02 * p.k))
    assert s.evidence[0].draft_s == pytest.approx(1.2, rel=0.1) and s.k > 0


def test_adaptive_k_is_not_priced_out_by_a_stalled_first_round():
    """A draft that pays (all accepted, 0.3 of a step per token) whose very first measured round stalls
    at 5x (seen in 1 of 5 fresh servers: the int4 self-draft priced out for a whole request): it keeps
    drafting through the rounds that measure its cost, and its estimate comes back within 10%."""
    s = AdaptiveK()
    ks = []
    for i in range(15):
        p = _plan(s)
        _record(s, p, p.k, (1.5 if i == 1 else 0.3) if p.k else None, 1.0 + 0.02 * p.k)
        ks.append(p.k)
    assert all(k > 0 for k in ks[1:]), ks
    assert s.evidence[0].draft_s == pytest.approx(0.3, rel=0.1)


@pytest.mark.parametrize("catchup_s, probes", [(0.3, (0, 0)), (0.001, (3, 8))])
def test_adaptive_k_budgets_probes_that_need_a_catch_up(catchup_s, probes):
    """A useless draft with its own KV cache must be fed every token of the rounds it sat out
    before a probe can draft. When that costs 0.3 of a decode step per token, a probe after g
    idle rounds costs 0.3 g steps, never within the 1% budget: no probes at all. When it costs
    0.001 per token, probes go on as for a draft without a cache."""
    s = AdaptiveK(k_start=4)
    fed = 0  # context tokens the draft has seen
    ks = []
    for r in range(600):
        context = r + 10
        p = _plan(s, 0, context - fed)
        k = p.k
        if k:
            _record(s, p, 0, 0.5, 1.0 + 0.05 * k, catchup_tokens=context - fed, catchup_s=catchup_s * (context - fed))
            fed = context
        else:
            _record(s, p, 0, None, 1.0)
        ks.append(k)
    assert ks[19] == 0 and s.k == 0
    n = sum(k > 0 for k in ks[20:])
    assert probes[0] <= n <= probes[1]
    assert s.probe_s <= s.probe_budget * s.decode_s  # the budget held


@pytest.mark.parametrize("hit_every, drafts", [(2, True), (6, False)])
def test_adaptive_k_models_bursty_drafts(hit_every, drafts):
    """Prompt lookup is all or nothing: its first guess is usually wrong, and a right one stays
    right. Free drafts, verify cost +25% per extra token: drafting pays when every 2nd round
    hits (1 + 0.5 K tokens for 1 + 0.25 K cost), not when every 6th does."""
    s = AdaptiveK(k_start=4)
    ks = []
    for r in range(200):
        p = _plan(s)
        k = p.k
        hit = r % hit_every == 0
        _record(s, p, k if hit else 0, 0.0 if k else None, 1.0 + 0.25 * k)
        ks.append(k)
    tail = ks[100:]
    assert (sum(k > 0 for k in tail) > 90) if drafts else (sum(k > 0 for k in tail) < 10)


def test_parse_draft_tokens():
    assert parse_draft_tokens("auto") == "auto" and parse_draft_tokens("5") == 5 and parse_draft_tokens("0") == 0
    for bad in ("-1", "x", "2.5"):
        with pytest.raises(SlmError, match="draft-tokens"):
            parse_draft_tokens(bad)


def test_load_draft_checks_vocabulary(tmp_path, tokenizer_dir, tiny_model_dir):
    from slm.load import load_model

    target = load_model(tiny_model_dir)
    draft_dir = make_model_dir(tmp_path / "draft", tokenizer_dir, seed=5, n_layers=1)
    d = load_draft(str(draft_dir), target=target, target_dir=tiny_model_dir)
    assert isinstance(d, ModelDraft)
    assert isinstance(load_draft("ngram", target=target, target_dir=tiny_model_dir), NgramDraft)
    if importlib.util.find_spec("transformers"):  # the same directory through transformers
        hf = load_draft(f"hf:{draft_dir}", target=target, target_dir=tiny_model_dir)
        assert isinstance(hf.lm, HFLM)
        prompt = [5, 9, 14]
        assert generate(target, prompt, 10, draft=hf, draft_tokens=3, stop=Stop()).tokens == \
            generate(target, prompt, 10, stop=Stop()).tokens
    # A smaller tokenizer from the same BPE training is a prefix of the target's: accepted.
    prefix_tok = make_tokenizer_dir(tmp_path / "prefix_tok", vocab_size=300)
    prefix = make_model_dir(tmp_path / "prefix", prefix_tok, seed=5)
    assert load_draft(str(prefix), target=target, target_dir=tiny_model_dir).width == 300
    # The same tokens under other ids: refused, naming the id.
    other_tok = tmp_path / "other_tok"
    shutil.copytree(tokenizer_dir, other_tok)
    spec = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other_tok / "tokenizer.json").write_text(json.dumps(spec))
    other = make_model_dir(tmp_path / "other", other_tok, seed=5)
    with pytest.raises(SlmError, match="differs from the target's .* at id 100"):
        load_draft(str(other), target=target, target_dir=tiny_model_dir)
    bare = make_model_dir(tmp_path / "bare", None, seed=5, vocab_size=320)
    with pytest.raises(SlmError, match="no tokenizer files"):
        load_draft(str(bare), target=target, target_dir=tiny_model_dir)
    with pytest.raises(SlmError, match="no such file"):
        load_draft(str(tmp_path / "missing"), target=target, target_dir=tiny_model_dir)


def test_cli_generate_with_draft(tmp_path, tokenizer_dir, tiny_model_dir, capsys):
    from slm.cli import main

    draft_dir = make_model_dir(tmp_path / "draft", tokenizer_dir, seed=5, n_layers=1)

    def run(*extra):
        code = main(["generate", str(tiny_model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "12",
                     "--json", *extra])
        out = capsys.readouterr()
        assert code == 0, out.err
        return json.loads(out.out)

    plain = run()
    for extra in (["--draft", str(draft_dir), "--draft-tokens", "3"], ["--draft", "ngram"]):
        spec = run(*extra)
        assert spec["tokens"] == plain["tokens"]
        assert {"acceptance_rate", "mean_accepted", "rounds", "draft_forwards"} <= spec.keys()
    assert main(["generate", str(tiny_model_dir), "--prompt", "x", "--draft", "ngram", "--draft-tokens", "-2"]) == 2
    assert "draft-tokens" in capsys.readouterr().err


# --- transformers models as target and draft --------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, target, drafts):
    transformers = pytest.importorskip("transformers")
    from slm.weights import save_model

    root = tmp_path_factory.mktemp("hf")
    load = lambda m, name: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(save_model(m, root / name)), dtype=torch.float32).eval()
    return load(target, "target"), load(drafts["other"], "draft")


def test_transformers_target_and_draft(hf_pair, target, drafts):
    hf_target, hf_draft = hf_pair
    for prompt in _prompts(3, seed=2):
        ids = torch.tensor([prompt])
        ref = hf_target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        for draft in (drafts["other"], hf_draft, hf_target, NgramDraft()):
            for k in (1, 4, "auto"):
                r = generate(hf_target, prompt, 12, draft=draft, draft_tokens=k, stop=Stop())
                assert r.tokens == ref, (type(draft).__name__, k)
        # a transformers draft in front of our target
        assert generate(target, prompt, 12, draft=hf_draft, draft_tokens=3, stop=Stop()).tokens == \
            generate(target, prompt, 12, stop=Stop()).tokens


# --- the real SmolLM2 target --------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_greedy_equivalence():
    from slm.assets import smollm2_gguf
    from slm.gguf_import import cached_import
    from slm.tokenizer import Tokenizer
    from slm.load import load_model

    try:
        model_dir = cached_import(smollm2_gguf())
    except SlmError as e:
        pytest.skip(str(e))
    target = load_model(model_dir)
    tok = Tokenizer.load(model_dir)
    prompts = [tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
               tok.encode("<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n")]
    drafts = {name: load_draft(name, target, model_dir) for name in ("ngram", "int8", "auto")}
    for prompt in prompts:
        ref = generate(target, prompt, 24, stop=Stop()).tokens
        for name, draft in drafts.items():
            for k in (3, "auto"):
                r = generate(target, prompt, 24, draft=draft, draft_tokens=k, stop=Stop())
                assert r.tokens == ref, (name, k)
                if name == "int8" and k == 3:  # the int8 copy agrees with its target most of the time
                    assert r.stats["acceptance_rate"] > 0.5, r.stats


def test_auto_schedule_carries_over_between_generations(target, drafts):
    """A draft that never helps is learned once: the next prompt only probes it now and then."""
    draft = ModelDraft(as_lm(drafts["wrong"]), target.config.vocab_size)
    first = generate(target, [5, 6, 7], 40, draft=draft, draft_tokens="auto", stop=Stop())
    second = generate(target, [8, 9, 10], 40, draft=draft, draft_tokens="auto", stop=Stop())
    assert first.stats["draft_n_accepted"] == second.stats["draft_n_accepted"] == 0
    assert first.stats["draft_n"] >= 2  # the first drafted round (K = k_start = 2) at least
    assert second.stats["draft_n"] < first.stats["draft_n"]
    assert second.tokens == generate(target, [8, 9, 10], 40, stop=Stop()).tokens


def test_self_draft_shares_the_target_cache(target):
    """`int4`/`int8`/`auto`: the target's quantized copy reads the target's KV cache, so it never
    prefills the prompt or catches up: every proposal starts by feeding the one pending token."""
    from slm.speculative import SelfDraft

    for spec in ("int4", "int8"):
        draft = load_draft(spec, target=target)
        assert isinstance(draft, SelfDraft)
        calls = []
        forward = draft.lm.forward
        draft.lm.forward = lambda tokens, start, last_only=False: calls.append(len(tokens)) or forward(tokens, start, last_only)
        for prompt in _prompts(4, seed=3):
            ref = generate(target, prompt, 20, stop=Stop()).tokens
            for k in (1, 3, "auto"):
                assert generate(target, prompt, 20, draft=draft, draft_tokens=k, stop=Stop()).tokens == ref
        assert calls and set(calls) == {1}
    with pytest.raises(SlmError, match="another model"):
        generate(_tiny(5), [3, 4, 5], 4, draft=load_draft("int4", target=target))


def test_adaptive_k_learns_per_evidence():
    """Prompt lookup's evidence (the matched n-gram's length): long matches always right, short
    ones always wrong. K grows for the first and falls to 0 for the second."""
    s = AdaptiveK(k_start=4)
    for r in range(300):
        ev = 8 if r % 2 else 1
        p = _plan(s, ev)
        k = p.k
        _record(s, p, k if ev == 8 else 0, 1e-6 if k else None, 1.0 + 0.05 * k)
    assert s.evidence[8].k >= 10 and s.evidence[1].k == 0
