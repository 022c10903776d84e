"""Continuous batching's building blocks: per-row KV-cache positions in the model (each row's logits
equal that sequence's own single-request logits), and the scheduler, driven step by step, giving
each request exactly its single-request output while requests join and leave."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from slm.config import get_config
from slm.generate import Stop, generate
from slm.model import Transformer
from slm.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0) -> Transformer:
    return randomize(Transformer(get_config("tiny")), seed).eval()


def _single_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of one sequence, through the (T,) cache path one token at a time."""
    model.setup_cache(batch_size=1, max_seq_len=64)
    out = [model(torch.tensor([[t]]), torch.tensor([i]))[0, -1] for i, t in enumerate(tokens)]
    return torch.stack(out)  # (T, V)


@torch.inference_mode()
def test_rows_at_their_own_positions_match_single_sequences():
    model = _tiny(1)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 2, 7)]
    want = [_single_logits(model, s) for s in seqs]
    B = len(seqs)
    model.setup_cache(batch_size=B, max_seq_len=64)
    # Stale junk in the cache must never be read: fill it first.
    for layer in model.layers:
        layer.attention.kv_cache.k.normal_(generator=g)
        layer.attention.kv_cache.v.normal_(generator=g)
    # Prefill the first 2 tokens of every row as (B, 2) at per-row positions 0..1 ...
    ids = torch.tensor([s[:2] for s in seqs])  # (B, 2)
    pos = torch.arange(2).expand(B, 2)  # (B, 2)
    logits = model(ids, pos)  # (B, 2, V)
    for b in range(B):
        torch.testing.assert_close(logits[b], want[b][:2], rtol=1e-5, atol=1e-5)
    # ... then step the rows one token at a time, each at its own position: rows start at different
    # offsets (row b skips its first b steps), so the batch always mixes positions.
    cursor = [2] * B
    for step in range(12):
        live = [b for b in range(B) if cursor[b] < len(seqs[b]) and step >= b]
        if not live:
            continue
        ids = torch.tensor([[seqs[b][cursor[b]] if b in live else 0] for b in range(B)])  # (B, 1)
        pos = torch.tensor([[cursor[b] if b in live else 60] for b in range(B)])  # idle rows write a spare position
        logits = model(ids, pos)[:, -1]  # (B, V)
        for b in live:
            torch.testing.assert_close(logits[b], want[b][cursor[b]], rtol=1e-5, atol=1e-5)
            cursor[b] += 1
    assert all(c == len(s) for c, s in zip(cursor, seqs))


def test_kv_cache_rows_share_memory():
    model = _tiny()
    model.setup_cache(batch_size=3, max_seq_len=8)
    cache = model.layers[0].attention.kv_cache
    view = cache.rows(1, 2)
    view.k.fill_(7.0)
    assert (cache.k[1] == 7).all() and (cache.k[0] == 0).all() and (cache.k[2] == 0).all()


# --- the scheduler, stepped by hand ---------------------------------------------------------


class _Tok:
    """Decodes ids to a string of id tags (the scheduler only needs decode)."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


_IDS = []


def _scheduler(model, max_batch=3, draft=None, **kwargs):
    from slm.serve.decoding import Decoder
    from slm.serve.metrics import Metrics
    from slm.serve.scheduler import Scheduler

    return Scheduler(Decoder(model, max_batch, 64, draft), max_batch, 16, Metrics(), **kwargs)


def _request(prompt, n, temperature=0.0, seed=None):
    from slm.serve.requests import Request

    events = []
    req = Request(id=str(len(_IDS)), prompt=prompt, max_tokens=n, sampling=SamplingParams(temperature=temperature),
                  tokenizer=_Tok(), emit=events.append, seed=seed)
    _IDS.append(req.id)
    return req, events


def _drive(sched, arrivals: dict[int, list]):
    """Run the scheduler loop body by hand; arrivals[step] are submitted before that step."""
    step = 0
    while step < 200:
        for req in arrivals.get(step, []):
            sched.submit(req)
        with sched.cond:
            sched._admit()
            active = [r for r in sched.rows if r is not None]
        if active:
            if len(active) == 1 and not sched.waiting:
                sched._run_alone(active[0])
            else:
                sched._step(active)
        elif step > max(arrivals):
            return
        step += 1
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("draft", [None, "ngram"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_joining_and_leaving_requests_get_their_single_request_output(draft, temperature, native, monkeypatch):
    """Native: joining prompts ride in the step's ragged call; without the kernels (SLM_NATIVE=0) they
    are prefilled one by one and the rows step through the model."""
    from slm.speculative import NgramDraft

    if not native:
        monkeypatch.setenv("SLM_NATIVE", "0")
    model = _tiny(2)
    g = torch.Generator().manual_seed(3)
    specs = [(torch.randint(3, 256, (n,), generator=g).tolist(), m) for n, m in ((6, 9), (3, 14), (11, 4), (4, 20), (8, 12))]
    want = []
    for i, (prompt, m) in enumerate(specs):
        gen = torch.Generator().manual_seed(100 + i)
        want.append(generate(model, prompt, m, SamplingParams(temperature=temperature), stop=Stop(),
                             generator=gen).tokens)
    sched = _scheduler(model, max_batch=2, draft=NgramDraft() if draft else None)
    reqs = [_request(p, m, temperature, seed=100 + i) for i, (p, m) in enumerate(specs)]
    # 0 and 1 run alone; 2 and 3 are batched; 4 waits, then takes the row 2 left while 3 still runs in the
    # row after it (the step that prefills 4 decodes 3: row 0 sits that step out).
    _drive(sched, {0: [reqs[0][0]], 3: [reqs[1][0]], 4: [reqs[2][0], reqs[3][0]], 6: [reqs[4][0]]})
    for (req, events), w in zip(reqs, want):
        assert req.finish_reason == "length" and events[-1] == {"type": "done", "finish_reason": "length"}
        if temperature == 0.0 or draft is None:
            # Greedy: the target's argmax whatever the mode; sampled without a draft: one draw per token
            # from the request's own generator in both modes, so even the random stream is the same.
            assert req.generated == w
        else:
            assert len(req.generated) == len(w)  # sampled with a draft: exact in distribution (tested in test_speculative_sampling)
    assert sched.rows_in_use() == 0
    assert sched.metrics.steps["batched"] > 0 and sched.metrics.steps["alone"] > 0


@pytest.mark.parametrize("native", [True, False])
def test_a_request_reuses_the_prefix_a_free_row_holds_bit_for_bit(native, monkeypatch):
    """A shared system prompt, then a follow-up turn: each new request takes the free row whose cache
    holds the longest prefix of its prompt and computes only the rest; its output is its single-request
    output and its row's keys/values are bit for bit those of a fresh prefill. A request with nothing
    to reuse takes an empty row rather than one that holds a prefix. Without the kernels, no reuse."""
    import copy

    from slm.native import decoder

    if not native:
        monkeypatch.setenv("SLM_NATIVE", "0")
    model = _tiny(5)
    g = torch.Generator().manual_seed(11)
    system = torch.randint(3, 256, (7,), generator=g).tolist()
    a_prompt, b_prompt = system + [40, 41, 42], system + [50, 51]
    c_prompt = torch.randint(3, 256, (5,), generator=g).tolist()
    want_b = generate(model, b_prompt, 4, stop=Stop()).tokens
    d_prompt = b_prompt + want_b[:2] + [60]  # the next turn of b's chat
    specs = {"a": (a_prompt, 6), "b": (b_prompt, 4), "c": (c_prompt, 14), "d": (d_prompt, 5)}
    want = {k: generate(model, p, n, stop=Stop()).tokens for k, (p, n) in specs.items()}
    sched = _scheduler(model, max_batch=2)
    reqs = {k: _request(p, n)[0] for k, (p, n) in specs.items()}
    _drive(sched, {0: [reqs["a"]]})  # alone: row 0 keeps a's context
    assert sched.held[0] == (a_prompt + want["a"])[:-1] if native else sched.held[0] == []
    _drive(sched, {0: [reqs["c"], reqs["b"]], 3: [reqs["d"]]})  # c: row 1 (empty); b: row 0; d joins c there
    assert {k: r.generated for k, r in reqs.items()} == want
    reused = {k: r.reused for k, r in reqs.items()}
    assert reused == ({"a": 0, "b": 7, "c": 0, "d": len(b_prompt) + 2} if native else dict.fromkeys(reqs, 0))
    assert reqs["d"].usage()["prompt_tokens_details"] == {"cached_tokens": reused["d"]}
    assert sched.metrics.prompt_tokens_cached == sum(reused.values())
    if native:
        held = sched.held[0]
        assert held == (d_prompt + want["d"])[:-1]
        ref = copy.deepcopy(model)
        ref.setup_cache(1, 64)
        with torch.inference_mode():
            decoder(ref)(torch.tensor([held]), torch.arange(len(held)))
        for mine, theirs in zip(sched.decoder.caches.row[0], ref.layers):  # row 0's cache, layer by layer
            for a, b in ((mine.k, theirs.attention.kv_cache.k), (mine.v, theirs.attention.kv_cache.v)):
                assert torch.equal(a[0, :, : len(held)], b[0, :, : len(held)])


def test_a_prefix_a_running_request_holds_is_copied_into_the_new_rows():
    """Requests arriving while one with the same system prompt runs: each gets that prefix copied from the
    running row into its own (bit for bit those of a fresh prefill) and its single-request output."""
    import copy

    from slm.native import decoder

    model = _tiny(6)
    g = torch.Generator().manual_seed(12)
    system = torch.randint(3, 256, (9,), generator=g).tolist()
    other = torch.randint(3, 256, (4,), generator=g).tolist()
    specs = [(system + [40, 41], 12), (other, 12), (system + [50], 6), (system + [60, 61, 62], 5)]
    want = [generate(model, p, n, stop=Stop()).tokens for p, n in specs]
    sched = _scheduler(model, max_batch=4)
    reqs = [_request(p, n)[0] for p, n in specs]
    _drive(sched, {0: reqs[:2], 2: reqs[2:]})  # rows 0 and 1 run; the others join in rows 2 and 3
    assert [r.generated for r in reqs] == want
    assert [r.reused for r in reqs] == [0, 0, 9, 9] and sched.metrics.prompt_tokens_cached == 18
    ref = copy.deepcopy(model)
    ref.setup_cache(1, 64)
    for row in (2, 3):
        held = sched.held[row]
        assert held[:9] == system
        with torch.inference_mode():
            decoder(ref)(torch.tensor([held]), torch.arange(len(held)))
        for mine, theirs in zip(sched.decoder.caches.row[row], ref.layers):
            assert torch.equal(mine.k[0, :, : len(held)], theirs.attention.kv_cache.k[0, :, : len(held)])
            assert torch.equal(mine.v[0, :, : len(held)], theirs.attention.kv_cache.v[0, :, : len(held)])


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_joining_prompt_is_prefilled_in_chunks_while_others_decode(chunk):
    """Chunked prefill: while requests decode, each step carries at most `chunk` prompt tokens of the
    joining requests, oldest first (b's 13 tokens, then c's 5), and every request still gets its
    single-request output. A request cancelled halfway through its prompt leaves its row holding the
    part computed, which the next request with that prompt reuses, bit for bit."""
    model = _tiny(7)
    g = torch.Generator().manual_seed(13)
    specs = {k: (torch.randint(3, 256, (n,), generator=g).tolist(), m)
             for k, n, m in (("a", 4, 40), ("x", 3, 30), ("b", 13, 6), ("c", 5, 6))}
    want = {k: generate(model, p, m, stop=Stop()).tokens for k, (p, m) in specs.items()}
    sched = _scheduler(model, max_batch=4, prefill_chunk=chunk)
    reqs = {k: _request(p, m)[0] for k, (p, m) in specs.items()}
    calls = []  # per ragged call: (request, first position, tokens) of each segment
    step_rows = sched.decoder.step_rows

    def spy(segments, keep):
        calls.append([(sched.rows[row], start, len(tokens)) for row, tokens, start in segments])
        return step_rows(segments, keep)

    sched.decoder.step_rows = spy
    # a and x arrive together (nothing runs: both prompts whole in one step); b and c join while they decode.
    _drive(sched, {0: [reqs["a"], reqs["x"]], 2: [reqs["b"], reqs["c"]]})
    assert {k: r.generated for k, r in reqs.items()} == want
    assert [(r, n) for r, start, n in calls[0]] == [(reqs["a"], 4), (reqs["x"], 3)]
    chunked = [[(r, n) for r, start, n in call if r in (reqs["b"], reqs["c"]) and start < len(r.prompt)]
               for call in calls[1:]]
    assert all(sum(n for r, n in call) <= chunk for call in chunked)
    order = [r for call in chunked for r, n in call]
    assert order == [reqs["b"]] * (-(-13 // chunk)) + [reqs["c"]] * (len(order) - (-(-13 // chunk)))
    assert sum(n for call in chunked for r, n in call) == 13 + 5

    # d's prompt is cancelled after two chunks while a and x decode; the same prompt sent again reuses them.
    sched = _scheduler(model, max_batch=3, prefill_chunk=chunk)
    a, x = _request(*specs["a"])[0], _request(*specs["x"])[0]
    cancelled, again = _request(*specs["b"])[0], _request(*specs["b"])[0]
    for req in (a, x):
        sched.submit(req)
    for step in range(3):  # a and x join whole; then two steps carry d's first two chunks
        if step == 1:
            sched.submit(cancelled)
        with sched.cond:
            sched._admit()
            sched._step([r for r in sched.rows if r is not None])
    assert cancelled.cached == 2 * chunk and not cancelled.generated
    sched.cancel(cancelled)
    _drive(sched, {0: [again]})
    assert (a.generated, x.generated, again.generated) == (want["a"], want["x"], want["b"])
    assert again.reused == 2 * chunk


def test_a_joining_chunk_fills_the_native_call_the_running_rows_start_and_no_more():
    """With two rows decoding, a 40-token prompt joins in chunks of what one native call has room for
    beside them (30, then its last 10), not of the full chunk (32 + 2 rows would be two calls, each
    streaming every weight); each request still gets its single-request output."""
    model = _tiny(8)
    g = torch.Generator().manual_seed(14)
    specs = [(torch.randint(3, 256, (n,), generator=g).tolist(), m) for n, m in ((4, 20), (3, 20), (40, 6))]
    want = [generate(model, p, m, stop=Stop()).tokens for p, m in specs]
    sched = _scheduler(model, max_batch=3, prefill_chunk=32)
    assert sched.decoder.call_rows == 32
    reqs = [_request(p, m)[0] for p, m in specs]
    sizes, step_rows = [], sched.decoder.step_rows

    def spy(segments, keep):
        sizes.append([len(tokens) for _, tokens, _ in segments])
        return step_rows(segments, keep)

    sched.decoder.step_rows = spy
    _drive(sched, {0: reqs[:2], 2: reqs[2:]})
    assert [r.generated for r in reqs] == want
    assert [s for s in sizes if len(s) == 3][:2] == [[30, 1, 1], [10, 1, 1]]
    assert max(map(sum, sizes[1:])) <= 32


def test_cancelled_request_frees_its_row_at_the_next_step():
    model = _tiny(2)
    sched = _scheduler(model, max_batch=2)
    a, _ = _request([5, 6, 7], 30)
    b, _ = _request([8, 9], 30)
    sched.submit(a)
    sched.submit(b)
    with sched.cond:
        sched._admit()
    sched._step([a, b])
    sched._step([a, b])
    sched.cancel(a)
    with sched.cond:
        sched._admit()
    assert sched.rows == [None, b]
    assert sched.metrics.requests["cancelled"] == 1


def test_batched_verification_of_per_row_lookup_drafts():
    """Two greedy requests decoded together from start to end (same length): their rows carry
    prompt-lookup drafts verified in the batched forward, and each output is the single-request one."""
    from slm.speculative import NgramDraft

    model = _tiny(4)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 256, (k,), generator=g).tolist() * 4 for k in (3, 5)]  # repeats: lookups match
    want = [generate(model, p, 30, stop=Stop()).tokens for p in prompts]
    sched = _scheduler(model, max_batch=2, draft=NgramDraft())
    reqs = [_request(p, 30) for p in prompts]
    for r, _ in reqs:
        sched.submit(r)
    with sched.cond:
        sched._admit()
    while not any(r.done for r, _ in reqs):  # batched steps only
        sched._step([r for r, _ in reqs])
    drafted = sum(r.spec.accepted_tokens for r, _ in reqs)
    assert drafted > 0 and drafted == sum(sum(r.drafted) for r, _ in reqs)
    assert sum(r.spec.draft_tokens for r, _ in reqs) >= drafted and sched.metrics.steps["alone"] == 0
    _drive(sched, {0: []})  # the rest (the longer one alone)
    assert [r.generated for r, _ in reqs] == want


def test_lookup_gate_drafts_only_positions_that_pay():
    """The batched steps' lookup drafting closes position by position when its drafts are mostly
    rejected, keeps probing, and opens again when they are accepted."""
    from slm.serve.decoding import BATCH_LOOKUP_K, LookupGate

    gate = LookupGate()
    assert gate.positions() == BATCH_LOOKUP_K  # the prior is open
    for _ in range(60):  # the first token accepted 80% of the time, later ones never
        gate.record(BATCH_LOOKUP_K, 1 if gate.steps % 5 else 0)
        gate.positions()
    counts = [gate.positions() for _ in range(2 * LookupGate.PROBE_EVERY)]
    assert sorted(set(counts)) == [1, BATCH_LOOKUP_K]  # position 0 only, plus the periodic probes
    assert counts.count(BATCH_LOOKUP_K) == 2
    for _ in range(100):  # everything accepted: every position opens
        gate.record(BATCH_LOOKUP_K, BATCH_LOOKUP_K)
    assert gate.positions() == BATCH_LOOKUP_K and gate.positions() == BATCH_LOOKUP_K
    for _ in range(200):  # nothing accepted: drafting stops but for the probes
        gate.record(BATCH_LOOKUP_K, 0)
    assert [gate.positions() for _ in range(LookupGate.PROBE_EVERY)].count(0) == LookupGate.PROBE_EVERY - 1


@pytest.mark.parametrize("max_batch,ctx", [(1, 2), (1, 8), (3, 64)])
def test_warm_up_runs_at_any_context_and_leaves_a_fresh_schedule(max_batch, ctx):
    """The server's warm-up (before it answers) fits the smallest context and a single row, the
    draft's schedule starts afresh after it (its timings of first calls are dropped), and a request
    decoded after it is exactly what generate gives."""
    from slm.serve.decoding import Decoder
    from slm.speculative import NgramDraft

    draft = NgramDraft()
    before = draft.auto_schedule
    dec = Decoder(_tiny(), max_batch, ctx, draft)
    dec.warm_up()
    assert draft.auto_schedule is not before
    prompt = [5, 6, 7][: ctx - 1]
    want = generate(_tiny(), prompt, ctx - len(prompt), stop=Stop()).tokens
    got = []
    dec.run_alone(0, prompt, 0, len(want), SamplingParams(), (), torch.Generator(), lambda _: False,
                  lambda t, d: got.append(t))
    assert got == want and len(got) >= 1
