"""`slm serve` under concurrent clients, with and without a draft, against llama.cpp's `llama-server`
on the same weights.

    python benchmarks/serve.py --model SmolLM2.gguf --gguf SmolLM2.gguf --threads 2
    python benchmarks/serve.py --model DIR --draft auto --clients 1 2 --requests 2 --max-tokens 8 --no-llama

For each server and each number of concurrent clients (default 1, 2, 4, 8): every client sends
`--requests` streaming greedy chat completions one after another; reported are the total generated
tokens/s over the wall time, time to first token (mean) and inter-token latency p50/p95 (gaps
between streamed tokens as the client receives them; a speculative round's tokens arrive
together, so its gaps are near zero and the p95 shows the round time).

Servers (each started here on a free loopback port, stopped after its runs):
- slm, no draft; slm with `--draft` (default auto);
- llama-server from `--llama-server` (default: $SLM_LLAMACPP_BIN/llama-server, else the build of
  benchmarks/setup_llamacpp.sh in ~/.cache/slm/llama.cpp-0.3.36/build/bin) on `--gguf`, with
  `--parallel` slots = the largest client count, and once more with `--llama-spec-args` (its
  speculative options, e.g. "--spec-type ngram-simple" or "-md DRAFT.gguf --draft-max 8", which
  depend on the llama.cpp version) when given. Same weight precision: slm imports the GGUF and
  runs fp32 (or --quantize int8); pass a GGUF of the matching type (F32 / Q8_0) for a fair peer.
Goals (issue 15): 1 client, slm best draft >= 1.3x llama-server; 4 clients, slm total >= 2.5x
its 1-client rate and >= llama-server's total; p95 inter-token latency at 4 clients <= 2x 1 client.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash table is in three sentences.",
    "List five uses of the Python standard library's itertools module.",
    "Write a short poem about the sea.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for pancakes.",
    "Write a bash one-liner that counts the lines of all .py files in a directory.",
    "Summarise the plot of Romeo and Juliet.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def one_request(url: str, question: str, max_tokens: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, usage = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"tokens": n, "ttft": (arrivals[0] - t0) if arrivals else None, "gaps": gaps}


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        for i in range(requests):
            res = one_request(url, QUESTIONS[(c + i * clients) % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    gaps = sorted(g for r in results for g in r["gaps"])
    q = lambda p: gaps[min(len(gaps) - 1, int(p * len(gaps)))] * 1000 if gaps else None  # noqa: E731
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": clients, "tokens": sum(r["tokens"] for r in results), "seconds": round(wall, 3),
            "tokens_per_second": round(sum(r["tokens"] for r in results) / wall, 2),
            "ttft_ms": round(statistics.mean(ttfts) * 1000, 1) if ttfts else None,
            "itl_p50_ms": round(q(0.5), 2) if gaps else None, "itl_p95_ms": round(q(0.95), 2) if gaps else None}


def llama_server_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    base = os.environ.get("SLM_LLAMACPP_BIN") or Path.home() / ".cache/slm/llama.cpp-0.3.36/build/bin"
    path = Path(base) / "llama-server"
    return path if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="slm model directory or .gguf")
    ap.add_argument("--gguf", default=None, help="the same weights as a GGUF, for llama-server")
    ap.add_argument("--draft", default="auto", help="slm's draft for the speculative row (default auto)")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="slm runs int8 weights")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per request/slot (default 1024)")
    ap.add_argument("--llama-server", default=None, help="path of llama-server")
    ap.add_argument("--llama-spec-args", default=None, help="llama-server's speculative options, one string")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    batch = max(args.clients)
    slm = [sys.executable, "-m", "slm", "serve", args.model, "--threads", str(args.threads), "--max-batch",
           str(batch), "--ctx", str(args.ctx)] + (["--quantize", args.quantize] if args.quantize else [])
    servers = [("slm", slm), (f"slm --draft {args.draft}", slm + ["--draft", args.draft])]
    llama = None if args.no_llama else llama_server_path(args.llama_server)
    if not args.no_llama and (llama is None or args.gguf is None):
        print("note: llama-server or --gguf missing: no peer rows (build it with benchmarks/setup_llamacpp.sh)")
    elif llama is not None:
        base = [str(llama), "-m", args.gguf, "--threads", str(args.threads), "--parallel", str(batch),
                "-c", str(args.ctx * batch), "--host", "127.0.0.1"]
        servers.append(("llama-server", base))
        if args.llama_spec_args:
            servers.append((f"llama-server {args.llama_spec_args}", base + args.llama_spec_args.split()))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    rows = []
    for name, cmd in servers:
        port = free_port()
        proc = start(cmd + ["--port", str(port)], port, env)
        url = f"http://127.0.0.1:{port}"
        try:
            run_clients(url, 1, 1, min(8, args.max_tokens))  # warm-up
            for c in args.clients:
                row = {"server": name, **run_clients(url, c, args.requests, args.max_tokens)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print("\n| server | clients | tokens/s (total) | TTFT ms | ITL p50 ms | ITL p95 ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_second']} | {r['ttft_ms']} | {r['itl_p50_ms']} | "
              f"{r['itl_p95_ms']} |")
    if args.out:
        sys.path.insert(0, str(ROOT / "src"))
        from slm.atomic import write_json

        write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
