"""llama.cpp as the peer in slm's speed benchmarks: find its binaries, run them, parse tok/s.

The binaries come from `bash benchmarks/setup_llamacpp.sh` (a native CPU build in the slm cache),
or $SLM_LLAMACPP_BIN pointing at another build's bin directory. Used by benchmarks/decode.py and
benchmarks/speculative.py; not by the tests (CI has no llama.cpp).

    decode_tok_s(gguf, threads=2, n_gen=64, depth=0)   # llama-bench's tg rate (prefill of `depth` excluded)
    with Server(gguf, threads=1, extra=["--spec-type", "ngram-mod"]) as s:
        tokens, seconds, stats = s.complete(prompt_ids, n=64)   # greedy, exact token ids back
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

SDIST_VERSION = "0.3.36"  # benchmarks/setup_llamacpp.sh's default


def bin_dir() -> Path:
    env = os.environ.get("SLM_LLAMACPP_BIN")
    if env:
        return Path(env)
    cache = Path(os.environ.get("SLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slm")
    return cache / f"llama.cpp-{SDIST_VERSION}" / "build" / "bin"


def find(name: str) -> Path:
    """The path of llama.cpp binary `name` (e.g. "llama-bench"); SystemExit with the fix if missing."""
    path = bin_dir() / name
    if not path.is_file():
        raise SystemExit(f"{path}: llama.cpp is not built; run: bash benchmarks/setup_llamacpp.sh "
                         f"(or set SLM_LLAMACPP_BIN to a build's bin directory)")
    return path


def available() -> bool:
    return (bin_dir() / "llama-bench").is_file() and (bin_dir() / "llama-server").is_file()


def decode_tok_s(gguf: str | os.PathLike, threads: int, n_gen: int = 64, depth: int = 0, repetitions: int = 1) -> float:
    """llama-bench's text-generation rate: `n_gen` single-token decode steps after a prefill of
    `depth` tokens (the prefill is not timed), mean over `repetitions` runs after its own warm-up."""
    cmd = [str(find("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(n_gen),
           "-d", str(depth), "-r", str(repetitions), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    rows = [r for r in json.loads(out.stdout) if r.get("n_gen") == n_gen]
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench: expected one tg row, got {out.stdout[:300]}")
    return float(rows[0]["avg_ts"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A llama-server on a loopback port for one model and one speculative setting (llama.cpp sets
    the speculative type per server, not per request). Greedy completions of token-id prompts,
    returning the exact token ids and llama.cpp's own timing (prompt + generation, no HTTP)."""

    def __init__(self, gguf: str | os.PathLike, threads: int, ctx: int = 4096, extra: list[str] | None = None):
        self.port = _free_port()
        cmd = [str(find("llama-server")), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
               "-c", str(ctx), "-np", "1", "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"]
        self.cmd = cmd + (extra or [])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log = open(os.devnull, "w")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}): {' '.join(self.cmd)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"llama-server did not become ready: {' '.join(self.cmd)}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def complete(self, prompt: list[int], n: int) -> tuple[list[int], float, dict]:
        """Greedy (top-k 1), exactly `n` new tokens (EOS ignored), no prompt cache reuse ->
        (new token ids, llama.cpp's prompt + generation seconds, its timings dict)."""
        body = {"prompt": prompt, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        t = out["timings"]
        return list(out["tokens"]), (t["prompt_ms"] + t["predicted_ms"]) / 1e3, t
