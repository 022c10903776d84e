"""The batched, prefix-sharing log-likelihood harness against a plain per-request forward pass,
and its tokenization against lm_eval's HF backend (with a tokenizer that adds BOS)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from eval_helpers import make_model_dir
from slm.eval.loglikelihood import RequestEncoder, loglikelihoods, make_batches, tokenizer_adds_bos
from slm.tokenizer import Tokenizer
from slm.load import load_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ll")
    return {bos: make_model_dir(root / f"bos{int(bos)}", add_bos=bos, max_seq_len=48) for bos in (False, True)}


def reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One request alone, as lm_eval's HF backend computes it (left truncation to max_len + 1)."""
    inp = (ctx + cont)[-(model.config.max_seq_len + 1) :][:-1]
    with torch.no_grad():
        logits = model(torch.tensor([inp]))[0, -len(cont) :]  # (len(cont), V)
    logprobs = F.log_softmax(logits, dim=-1)
    target = torch.tensor(cont)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_packed_groups_match_one_request_at_a_time(model_dirs):
    model = load_model(model_dirs[False])
    g = torch.Generator().manual_seed(1)

    def rand(n):
        return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()

    ctx, tail = rand(9), rand(4)
    groups = [
        [(ctx, rand(3)), (ctx, rand(5)), (ctx, rand(1))],  # choices after one shared context
        [(ctx, tail), (ctx, tail + rand(2))],  # one choice is a prefix of the other: an empty branch
        [(rand(5), tail), (rand(7), tail)],  # WinoGrande-like: different contexts, shared continuation
        [(rand(20), rand(3))],  # a single request (LAMBADA)
        [(rand(40), rand(12)), (rand(30), rand(20))],  # longer than max_seq_len=48: left-truncated
        [(ctx, rand(2)), (ctx, rand(2))],
    ]
    for batch_size in (1, 2, 16):
        got = loglikelihoods(model, groups, batch_size=batch_size)
        for group, results in zip(groups, got):
            assert len(results) == len(group)
            for (c, k), (ll, greedy) in zip(group, results):
                ref_ll, ref_greedy = reference(model, c, k)
                assert ll == pytest.approx(ref_ll, abs=1e-4)
                assert greedy == ref_greedy


def test_greedy_continuation_is_recognised(model_dirs):
    model = load_model(model_dirs[False])
    ctx = [5, 17, 42, 8, 99]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([ctx + greedy]))[0, -1].argmax()))
    wrong = greedy[:2] + [(greedy[2] + 1) % model.config.vocab_size]
    [[(_, is_greedy), (_, not_greedy)]] = loglikelihoods(model, [[(ctx, greedy), (ctx, wrong)]])
    assert is_greedy and not not_greedy


def test_batches_are_longest_first_and_bounded():
    lengths = [5, 300, 7, 6, 50, 6, 6, 8]
    batches = make_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [1]  # the long one alone: 2 x 300 padded tokens exceed 3 x median
    assert all(len(b) <= 3 for b in batches)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def test_batches_are_the_cheapest_split():
    """The dynamic programme against every split of the sorted rows into runs of <= batch_size."""
    import itertools

    from slm.eval.loglikelihood import _FORWARD_COST_TOKENS

    def cost(batches, lengths):
        return sum(len(b) * max(lengths[i] for i in b) + _FORWARD_COST_TOKENS for b in batches)

    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 60, (8,), generator=rng).tolist()
        ls = sorted(lengths, reverse=True)
        best = min(
            sum(len(r) * r[0] + _FORWARD_COST_TOKENS for r in runs)
            for cuts in itertools.product([False, True], repeat=len(ls) - 1)
            for runs in [_runs(ls, cuts)]
            if all(len(r) <= 3 for r in runs)
        )
        assert cost(make_batches(lengths, batch_size=3), lengths) == best


def _runs(xs, cuts):
    runs, cur = [], [xs[0]]
    for x, cut in zip(xs[1:], cuts):
        if cut:
            runs.append(cur)
            cur = []
        cur.append(x)
    return runs + [cur]


def test_bos_rule_matches_transformers(model_dirs):
    transformers = pytest.importorskip("transformers")
    for bos, d in model_dirs.items():
        hf = transformers.AutoTokenizer.from_pretrained(d)
        tok = Tokenizer.load(d)
        assert tokenizer_adds_bos(tok, d) is bos
        assert (hf.encode("Question: why?")[0] == tok.bos_id) is bos


@pytest.mark.parametrize("bos", [False, True])
def test_requests_match_lm_eval_hf_backend(model_dirs, bos):
    """Tokenization (trailing spaces, empty context, BOS) and scores against lm_eval's HFLM."""
    pytest.importorskip("lm_eval")
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    d = model_dirs[bos]
    pairs = [
        ("Question: Which is a renewable resource?\nAnswer:", " trees"),
        ("The old dog slept by the fire until the ", " morning"),  # trailing space moves to the continuation
        ("", " Goodbye"),  # empty context: the prefix token (BOS, else EOS) conditions
        ("<s>Already starts with BOS", " text"),  # lm_eval adds no second BOS
        ("A man is sitting on a roof. He", " starts pulling up roofing on a roof." * 2),  # > 48: truncated
    ]
    lm = HFLM(pretrained=str(d), dtype="float32", device="cpu", batch_size=2)
    ref = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    encoder = RequestEncoder.for_model_dir(d)
    encoded = encoder.encode_pairs(pairs)
    for (c, k), p in zip(encoded, pairs):
        ref_ctx, ref_cont = (([lm.prefix_token_id], lm.tok_encode(p[1], add_special_tokens=False))
                             if p[0] == "" else lm._encode_pair(*p))
        assert (c, k) == (ref_ctx, ref_cont), p
    got = [r[0] for r in loglikelihoods(load_model(d), [[e] for e in encoded], batch_size=2)]
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, ref):
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
