"""What `slm generate --quantize` costs in quality: perplexity of SmolLM2-135M-Instruct on a fixed
held-out text, fp32 vs int8 vs int4 (int4 decoder layers, int8 lm_head), same tokens.

    python benchmarks/perplexity.py                    # about 2 minutes (1 thread)
    python benchmarks/perplexity.py --tokens 8192 --json

The text is Python standard-library source (textwrap.py, then argparse.py, ...: real code that
no weight was calibrated on; the quantisation is weight-only with max scales). It is cut into
non-overlapping windows of --window tokens; each window is scored from its first token
(no carried context), the same windows for every variant. Also the share of positions where the
quantised model's greedy next token equals fp32's. By default the logits come from the decoding
path (`slm.native`: int8/int4 weights with activations rounded to int8 in blocks of 32, as
llama.cpp's Q8_0/Q4_0 do); `--path eager` scores with the model's own forward instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slm.native import decode_logits  # noqa: E402

FILES = ("textwrap.py", "argparse.py", "difflib.py", "heapq.py", "shlex.py")


def text_ids(tokenizer, n: int) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in FILES:
        ids += tokenizer.encode((stdlib / name).read_text())
        if len(ids) >= n:
            return ids[:n]
    return ids


@torch.inference_mode()
def score(model, windows: torch.Tensor, path: str) -> tuple[float, torch.Tensor]:
    """-> (perplexity over every predicted position, greedy next tokens (windows, window-1)).
    path "decode": the decoding path (`slm.native.decode_logits`); "eager": the model's own forward
    (what `slm eval` scores with)."""
    nll, count, greedy = 0.0, 0, []
    for w in windows:
        if path == "decode":
            logits = decode_logits(model, w[:-1])  # (window-1, V)
        else:
            with torch.inference_mode():
                logits = model(w[None, :-1])[0]  # (window-1, V)
        nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
        greedy.append(logits.argmax(-1))
    return math.exp(nll / count), torch.stack(greedy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of text scored (default 4096)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="default: slm.threads' choice")
    ap.add_argument("--path", choices=["decode", "eager"], default="decode",
                    help="decode: the path `slm generate` runs (slm.native; default); eager: the model's forward")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from slm.assets import smollm2_gguf
    from slm.gguf_import import cached_import
    from slm.quantize import QUANTIZERS
    from slm.threads import set_threads
    from slm.tokenizer import Tokenizer
    from slm.load import load_model

    threads = set_threads(args.threads)
    model_dir = cached_import(smollm2_gguf())
    ids = text_ids(Tokenizer.load(model_dir), args.tokens)
    n_windows = len(ids) // args.window
    if n_windows == 0:
        raise SystemExit(f"--tokens {args.tokens} is shorter than one --window {args.window}")
    windows = torch.tensor(ids[: n_windows * args.window]).view(n_windows, args.window)  # (windows, window)
    rows, ref = [], None
    for kind in ("fp32", *QUANTIZERS):
        model = load_model(model_dir)
        if kind != "fp32":
            QUANTIZERS[kind](model)
        ppl, greedy = score(model, windows, args.path)
        ref = ref or (ppl, greedy)
        row = {"model": "smollm2-135m-instruct", "weights": kind, "tokens": windows.numel(), "window": args.window,
               "perplexity": round(ppl, 4), "vs_fp32": round(ppl / ref[0], 4),
               "same_next_token": round((greedy == ref[1]).float().mean().item(), 4), "threads": threads,
               "path": args.path}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{kind:5s} perplexity {ppl:8.4f}  x{row['vs_fp32']:.4f} of fp32  "
                  f"next token as fp32 {row['same_next_token']:.1%}", flush=True)
        del model
    if not args.json:
        print(f"{windows.numel()} tokens of stdlib source ({', '.join(FILES)}), windows of {args.window}, path {args.path}, "
              f"threads {threads}, loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
