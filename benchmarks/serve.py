"""`slm serve` under concurrent clients, with and without a draft, against llama.cpp's `llama-server`
on the same weights.

    python benchmarks/serve.py --model SmolLM2.gguf --gguf SmolLM2.gguf --threads 2
    python benchmarks/serve.py --model DIR --draft auto --clients 1 2 --requests 2 --max-tokens 8 --no-llama

For each server and each number of concurrent clients (default 1, 2, 4, 8): every client sends
`--requests` streaming greedy chat completions one after another over its own keep-alive connection
pool (as an application keeps its `openai.OpenAI()`); reported are the total generated
tokens/s over the wall time, time to first token (mean) and inter-token latency p50/p95 (gaps
between streamed tokens as the client receives them; a speculative round's tokens arrive
together, so its gaps are near zero and the p95 shows the round time).

`--rounds` rounds: each starts every server afresh (each on a free loopback port; idle while the
others run), then runs every client count on every server in turn (A, B, C, D at 1 client, then at
2, ...), then stops them. Printed: each run, the medians over rounds, issue 15's ratios of the medians and of each
round alone (runs seconds apart), the load average after each round and the memory bandwidth
(decode.py's probe) before and after.

Servers:
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
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]
from decode import measure_bandwidth  # noqa: E402  (torch, in this client process only)
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


def one_request(http: httpx.Client, url: str, question: str, max_tokens: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, usage = [], None
    for attempt in range(2):
        try:
            with http.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
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
            break
        except httpx.RemoteProtocolError:
            # The server closed the kept-alive connection without answering (llama-server 0.3.36 does, now and
            # then, between requests): once more on a new connection, as openai's client retries. Not mid-answer.
            if attempt or arrivals or usage:
                raise
    n = usage["completion_tokens"] if usage else len(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"tokens": n, "ttft": (arrivals[0] - t0) if arrivals else None, "gaps": gaps}


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    # One connection pool per client, made before the clock starts, as an application keeps its
    # `openai.OpenAI()`: a new httpx.Client per request costs ~40 ms of CPU (it loads the CA bundle;
    # benchmarks/overheads.py), which
    # on 2 cores both delays the request and slows whichever server is decoding meanwhile.
    https = [httpx.Client() for _ in range(clients)]

    def client(c: int):
        for i in range(requests):
            res = one_request(https[c], url, QUESTIONS[(c + i * clients) % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for http in https:
        http.close()
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


def goals(by: dict, slm_names: list[str], llama_names: list[str]) -> dict:
    """Issue 15's ratios from one set of rows, {(server, clients): row}: 1 client, slm's best over
    llama-server's best; 4 clients, slm (no draft) over llama-server's best and over its own 1-client
    rate; slm's inter-token p95 at 4 clients over its 1-client p95."""
    def tps(name, c):
        return by[(name, c)]["tokens_per_second"] if (name, c) in by else None

    out = {}
    llama1 = max((tps(n, 1) for n in llama_names if tps(n, 1)), default=None)
    llama4 = max((tps(n, 4) for n in llama_names if tps(n, 4)), default=None)
    best1 = max((tps(n, 1) for n in slm_names if tps(n, 1)), default=None)
    if best1 and llama1:
        out["1 client: slm best / llama-server best (goal >= 1.3)"] = best1 / llama1
    if tps("slm", 4) and llama4:
        out["4 clients: slm / llama-server best (goal >= 1.0)"] = tps("slm", 4) / llama4
    if tps("slm", 4) and tps("slm", 1):
        out["4 clients: slm / its 1-client rate (goal >= 2.5)"] = tps("slm", 4) / tps("slm", 1)
        out["slm inter-token p95, 4 clients / 1 client (goal <= 2)"] = (by[("slm", 4)]["itl_p95_ms"]
                                                                        / by[("slm", 1)]["itl_p95_ms"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="slm model directory or .gguf")
    ap.add_argument("--gguf", default=None, help="the same weights as a GGUF, for llama-server")
    ap.add_argument("--draft", default="auto", help="slm's draft for the speculative row (default auto)")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="slm runs int8 weights")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each runs every client count on every server, interleaved (default 3)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per request/slot (default 1024)")
    ap.add_argument("--llama-server", default=None, help="path of llama-server")
    ap.add_argument("--llama-spec-args", default=None, help="llama-server's speculative options, one string")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.rounds < 1 or args.requests < 1:
        raise SystemExit("--rounds and --requests must be >= 1")

    batch = max(args.clients)
    slm = [sys.executable, "-m", "slm", "serve", args.model, "--threads", str(args.threads), "--max-batch",
           str(batch), "--ctx", str(args.ctx)] + (["--quantize", args.quantize] if args.quantize else [])
    servers = [("slm", slm), (f"slm --draft {args.draft}", slm + ["--draft", args.draft])]
    slm_names = [name for name, _ in servers]
    llama = None if args.no_llama else llama_server_path(args.llama_server)
    if not args.no_llama and (llama is None or args.gguf is None):
        print("note: llama-server or --gguf missing: no peer rows (build it with benchmarks/setup_llamacpp.sh)")
    elif llama is not None:
        # --no-cache-idle-slots: by default, once every slot has held a request, each new task first saves
        # the idle slots to the prompt cache; measured at 4 clients after an 8-client run, that took
        # llama-server from 81-83 to 57-59 tok/s (100 with the option). The peer runs at its best here.
        base = [str(llama), "-m", args.gguf, "--threads", str(args.threads), "--parallel", str(batch),
                "-c", str(args.ctx * batch), "--no-cache-idle-slots", "--host", "127.0.0.1"]
        servers.append(("llama-server", base))
        if args.llama_spec_args:
            servers.append((f"llama-server {args.llama_spec_args}", base + args.llama_spec_args.split()))
    llama_names = [name for name, _ in servers if name not in slm_names]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    # Each round starts every server afresh (they idle while the others run) and interleaves them,
    # A, B, C, D at each client count, so the host's drift (10-15% between minutes here) falls on all
    # alike and a round's ratios compare runs taken seconds apart. Fresh per round because llama-server
    # (0.3.36) stays slower after it has served 8 clients: 36-48 tok/s at 2-4 clients against 59-87
    # before, even with --no-cache-idle-slots; slm shows no such drop across rounds.
    rows = []
    bandwidth = [measure_bandwidth()]
    load = [os.getloadavg()]
    for rnd in range(args.rounds):
        procs, urls = [], {}
        try:
            for name, cmd in servers:
                port = free_port()
                procs.append(start(cmd + ["--port", str(port)], port, env))
                urls[name] = f"http://127.0.0.1:{port}"
                run_clients(urls[name], 1, 1, min(8, args.max_tokens))  # warm-up
            for c in args.clients:
                for name, _ in servers:
                    time.sleep(1.0)  # the previous server's threads stop spinning
                    row = {"server": name, "round": rnd, **run_clients(urls[name], c, args.requests, args.max_tokens)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
        load.append(os.getloadavg())
    bandwidth.append(measure_bandwidth())

    keys = ["tokens_per_second", "ttft_ms", "itl_p50_ms", "itl_p95_ms"]
    medians = {}
    for name, _ in servers:
        for c in args.clients:
            runs = [r for r in rows if r["server"] == name and r["clients"] == c]
            medians[(name, c)] = {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys}
    print(f"\nmedians of {args.rounds} rounds")
    print("| server | clients | tokens/s (total) | TTFT ms | ITL p50 ms | ITL p95 ms |\n|---|---|---|---|---|---|")
    for (name, c), m in medians.items():
        print(f"| {name} | {c} | {m['tokens_per_second']:.1f} | {m['ttft_ms']:.0f} | {m['itl_p50_ms']:.1f} | "
              f"{m['itl_p95_ms']:.1f} |")
    per_round = [goals({(r["server"], r["clients"]): r for r in rows if r["round"] == rnd}, slm_names, llama_names)
                 for rnd in range(args.rounds)]
    of_medians = goals(medians, slm_names, llama_names)
    print("\n| ratio | of the medians | each round |\n|---|---|---|")
    for k, v in of_medians.items():
        print(f"| {k} | {v:.2f} | {' / '.join(f'{g[k]:.2f}' for g in per_round if k in g)} |")
    print(f"load average {' -> '.join(f'{a[0]:.2f}' for a in load)}; memory bandwidth "
          f"{bandwidth[0] / 1e9:.1f} / {bandwidth[1] / 1e9:.1f} GB/s (before / after)")
    if args.out:
        from slm.atomic import write_json

        write_json(args.out, {"args": vars(args), "rows": rows, "bandwidth": bandwidth, "loadavg": load,
                              "medians": [{"server": n, "clients": c, **m} for (n, c), m in medians.items()],
                              "goals_of_medians": of_medians, "goals_per_round": per_round})


if __name__ == "__main__":
    main()
