"""Interleaved A/B of `slm serve` settings: every variant is started once, then each round runs every
client count on every variant in turn (A, B, A, B, ...), with serve.py's clients (streaming greedy chat
completions, `--requests` per client, one after another).

    python benchmarks/serve_ab.py --model smollm2-dir --clients 4 --rounds 5 \
        "whole=--prefill-chunk 0" "chunk16=--prefill-chunk 16"

Printed: each run (tokens/s, TTFT, inter-token p50/p95), the medians per variant, the load average
after each round and the memory bandwidth (decode.py's probe) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]

from decode import measure_bandwidth  # noqa: E402
from serve import free_port, run_clients, start  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", metavar="NAME=ARGS", help="a name and the `slm serve` options it adds")
    ap.add_argument("--model", required=True, help="slm model directory or .gguf")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    variants = []
    for v in args.variants:
        name, sep, extra = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"variant {v!r}: expected NAME=ARGS")
        variants.append((name, extra.split()))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs, urls, rows = [], {}, []
    bandwidth, load = [measure_bandwidth()], [os.getloadavg()]
    try:
        for name, extra in variants:
            port = free_port()
            cmd = [sys.executable, "-m", "slm", "serve", args.model, "--threads", str(args.threads),
                   "--max-batch", str(max(args.clients)), "--port", str(port), *extra]
            procs.append(start(cmd, port, env))
            urls[name] = f"http://127.0.0.1:{port}"
            run_clients(urls[name], 1, 1, 8)  # warm-up
        for rnd in range(args.rounds):
            for c in args.clients:
                for name, _ in variants:
                    time.sleep(1.0)
                    row = {"variant": name, "round": rnd, **run_clients(urls[name], c, args.requests, args.max_tokens)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            load.append(os.getloadavg())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    bandwidth.append(measure_bandwidth())
    print("\n| variant | clients | tokens/s | TTFT ms | ITL p50 ms | ITL p95 ms |\n|---|---|---|---|---|---|")
    for name, _ in variants:
        for c in args.clients:
            runs = [r for r in rows if r["variant"] == name and r["clients"] == c]
            med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_second", "ttft_ms", "itl_p50_ms",
                                                                      "itl_p95_ms")}
            print(f"| {name} | {c} | {med['tokens_per_second']:.1f} | {med['ttft_ms']:.0f} | {med['itl_p50_ms']:.1f} | "
                  f"{med['itl_p95_ms']:.1f} |")
    print(f"load average {' -> '.join(f'{a[0]:.2f}' for a in load)}; memory bandwidth "
          f"{bandwidth[0] / 1e9:.1f} / {bandwidth[1] / 1e9:.1f} GB/s (before / after)")


if __name__ == "__main__":
    main()
