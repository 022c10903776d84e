"""Servers for the `slm serve` tests: in this process on a free loopback port (uvicorn in a thread),
or as an `slm serve` subprocess (for resident-memory checks)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
SRC = Path(__file__).resolve().parents[1] / "src"


def make_serve_model(path: Path, tokenizer_dir: Path, seed: int = 5) -> Path:
    """A tiny random model with a 1024-token context and a chat template."""
    from conftest import make_model_dir

    d = make_model_dir(path, tokenizer_dir, seed=seed, max_seq_len=1024)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_thread(model_dir: Path, **kwargs):
    """-> (base URL, ServerState) of a server running in this process until the block ends."""
    import uvicorn

    from slm.serve.app import create_app
    from slm.serve.server import build_state

    state = build_state(model_dir, **kwargs)
    state.scheduler.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.scheduler.stop()


@contextlib.contextmanager
def server_process(model_dir: Path, *args: str):
    """-> (base URL, Popen) of `slm serve MODEL *args` on a free loopback port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "slm", "serve", str(model_dir), "--port", str(port), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"slm serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("slm serve did not become healthy")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric(url: str, name: str) -> float:
    """One sample's value from /metrics (name with its labels, exactly as printed)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
