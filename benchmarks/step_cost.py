"""What one step of `slm serve` costs, by its shape: decode rows, a joining prompt alone, and both in one
ragged native call (`Decoder.step_rows`), against the same model's single-sequence prefill speed.

    python benchmarks/step_cost.py --model smollm2-dir --threads 2

The cases run interleaved (A, B, C, ... then again) after a warm-up; printed are the medians, the
load average and the memory bandwidth (decode.py's probe). The peer for the prefill rate is
`llama-bench -m MODEL.gguf -p 8,16,32,64 -n 0 -t 2` on the same weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]

import torch  # noqa: E402

from decode import measure_bandwidth  # noqa: E402
from slm.load import load_model  # noqa: E402
from slm.native import decoder  # noqa: E402
from slm.serve.decoding import Decoder  # noqa: E402
from slm.threads import set_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="slm model directory or .gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=25, help="tokens of the joining prompt (default 25)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    set_threads(args.threads)
    model = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    ctx = {r: torch.randint(10, 1000, (80,), generator=g).tolist() for r in range(8)}
    n = args.prompt

    serve = Decoder(model, 8, 1024)
    serve.warm_up()
    for r in range(8):
        serve.prefill_row(r, ctx[r][:60], 0)
    decode = [(r, [ctx[r][60]], 60) for r in range(4)]
    cases = {
        "1 decode row": ([decode[0]], [1]),
        "4 decode rows": (decode, [1] * 4),
        f"{n}-token prompt alone": ([(4, ctx[4][:n], 0)], [1]),
        f"3 decode rows + {n}-token prompt": (decode[:3] + [(4, ctx[4][:n], 0)], [1] * 4),
    }
    bandwidth, load = [measure_bandwidth()], [os.getloadavg()]
    times = {k: [] for k in cases}
    for rep in range(args.repeats + 1):
        for name, (segs, keep) in cases.items():
            t = time.perf_counter()
            serve.step_rows(segs, keep)
            if rep:  # the first pass is the warm-up
                times[name].append(time.perf_counter() - t)

    model.setup_cache(1, 1024)  # single-sequence prefill, as `slm generate` runs it
    run = decoder(model)
    prefill = {}
    for rep in range(args.repeats + 1):
        for T in (8, 16, 32, 64):
            ids = torch.tensor([ctx[7][:T]])  # (1, T)
            t = time.perf_counter()
            with torch.inference_mode():
                run(ids, torch.arange(T), logits_to_keep=1)
            if rep:
                prefill.setdefault(T, []).append(time.perf_counter() - t)
    bandwidth.append(measure_bandwidth())
    load.append(os.getloadavg())

    for name, ts in times.items():
        print(f"{name:34s} {statistics.median(ts) * 1000:7.1f} ms")
    print("prefill, one sequence: " + ", ".join(f"pp{T} {T / statistics.median(ts):.0f} tok/s" for T, ts in prefill.items()))
    print(f"threads {args.threads}; load average {load[0][0]:.2f} -> {load[1][0]:.2f}; memory bandwidth "
          f"{bandwidth[0] / 1e9:.1f} / {bandwidth[1] / 1e9:.1f} GB/s (before / after)")


if __name__ == "__main__":
    main()
