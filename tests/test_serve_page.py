"""The page at / in a real browser: Debian's chromium, headless, driven by selenium through Debian's
chromedriver. It loads the page from a running server, submits a prompt, waits for the stream and
checks the rendered tokens (the model's own greedy output) and their drafted/own marks.

SLM_SERVE_SCREENSHOT=docs/serve.png [SLM_SERVE_PAGE_MODEL=model dir or .gguf] also saves a
screenshot there (the README's picture is taken with SmolLM2-135M-Instruct)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver"),
              pytest.mark.usefixtures("one_thread")]

from serve_helpers import make_serve_model, server_thread  # noqa: E402


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1000,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_streams_tokens_with_their_marks(browser, tmp_path, tokenizer_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from slm.chat import apply_chat_template
    from slm.generate import Stop, generate
    from slm.tokenizer import Tokenizer
    from slm.load import load_model, resolve_model_dir

    model_path = os.environ.get("SLM_SERVE_PAGE_MODEL") or make_serve_model(tmp_path / "tiny", tokenizer_dir)
    question = os.environ.get("SLM_SERVE_PAGE_PROMPT", "Write a Python function that adds two numbers.")
    max_tokens = 60
    model_dir = resolve_model_dir(model_path)
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    prompt = tok.encode(apply_chat_template(model_dir, [{"role": "user", "content": question}]))
    stop = sorted({i for i in (model.config.eos_id, tok.eos_id) if i is not None})
    want = generate(model, prompt, max_tokens, stop=Stop(tuple(stop))).tokens

    with server_thread(model_path, max_batch=2, draft="auto", ctx=1024) as (url, _):
        browser.get(url + "/")
        browser.find_element(By.ID, "max").clear()
        browser.find_element(By.ID, "max").send_keys(str(max_tokens))
        browser.find_element(By.ID, "prompt").send_keys(question)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "status").text in ("done", "error"))
        assert browser.find_element(By.ID, "status").text == "done"
        spans = browser.find_elements(By.CSS_SELECTOR, "#log .answer .tok")
        ids = [int(s.get_attribute("data-token-id")) for s in spans]
        marks = [s.get_attribute("data-drafted") == "1" for s in spans]
        assert ids == want  # every token rendered, in order: the model's own greedy output
        answer = browser.find_element(By.CSS_SELECTOR, "#log .answer").get_attribute("textContent")
        assert answer == tok.decode(want[:-1] if want[-1] in stop else want)
        # Each token's mark is its class, drawn in its own colour.
        for s, drafted in zip(spans, marks):
            assert s.get_attribute("class") == "tok " + ("drafted" if drafted else "own")
        colours = {d: next(s.value_of_css_property("background-color") for s, m in zip(spans, marks) if m == d)
                   for d in set(marks)}
        assert any(marks) and not all(marks), "expected both drafted and own tokens"
        assert colours[True] != colours[False]
        # The live counters agree with the marks and with the server's own `timings`.
        assert browser.find_element(By.ID, "n").text == str(len(ids))
        accepted = int(browser.find_element(By.ID, "rate").text.split("/")[0])
        assert accepted >= sum(marks)
        png = browser.get_screenshot_as_png()
    assert png.startswith(b"\x89PNG")
    if os.environ.get("SLM_SERVE_SCREENSHOT"):
        from slm.atomic import write_bytes

        write_bytes(Path(os.environ["SLM_SERVE_SCREENSHOT"]), png)
