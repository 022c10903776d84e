"""Per-call costs on the serving path that are not the model: the greedy argmax over a vocabulary's
logits (slm's `argmax`, through numpy, against torch's), and making an httpx.Client (what a benchmark
client paid per request before it kept one per client).

    python benchmarks/overheads.py --threads 2

The cases run interleaved (A, B, A, B, ...) after a warm-up; printed are the medians of the per-call
times, the argmax pair's ratio, the load average and the memory bandwidth (decode.py's probe) before and after.
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
from slm.sampling import argmax  # noqa: E402
from slm.threads import set_threads  # noqa: E402


def per_call(f, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=49152, help="logits per row (default SmolLM2's 49152)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    set_threads(args.threads)
    import httpx

    row = torch.randn(args.vocab, generator=torch.Generator().manual_seed(0))
    pairs = {
        f"greedy argmax over {args.vocab} logits": (("torch", lambda: int(row.argmax(-1)), 2000),
                                                    ("slm", lambda: int(argmax(row)), 2000)),
        "an httpx.Client made and closed": (("httpx.Client()", lambda: httpx.Client().close(), 5),),
    }
    bandwidth, load = [measure_bandwidth()], [os.getloadavg()]
    times = {(name, label): [] for name, cases in pairs.items() for label, _, _ in cases}
    for rep in range(args.repeats + 1):
        for name, cases in pairs.items():
            for label, f, n in cases:
                t = per_call(f, n)
                if rep:  # the first pass is the warm-up
                    times[(name, label)].append(t)
    bandwidth.append(measure_bandwidth())
    load.append(os.getloadavg())
    for name, cases in pairs.items():
        med = [statistics.median(times[(name, label)]) for label, _, _ in cases]
        print(f"{name}: " + ", ".join(f"{label} {t * 1e6:.1f} us" for (label, _, _), t in zip(cases, med))
              + (f" ({med[0] / med[1]:.1f}x)" if len(med) == 2 else ""))
    print(f"threads {args.threads}; load average {load[0][0]:.2f} -> {load[1][0]:.2f}; memory bandwidth "
          f"{bandwidth[0] / 1e9:.1f} / {bandwidth[1] / 1e9:.1f} GB/s (before / after)")


if __name__ == "__main__":
    main()
