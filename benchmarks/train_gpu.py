"""Training throughput and MFU of slm's trainer step on one GPU (written for a lent H200).

amd-llama-135m, sequence 2048, bf16 autocast, fused AdamW: the trainer's own pieces
(`LanguageModel` with the fused chunked loss, `build_optimizer`), on random tokens, with
and without `torch.compile` of the transformer blocks, the two variants interleaved
after a warm-up. Prints tokens/s and MFU per variant and the load average.

    python benchmarks/train_gpu.py                       # on the GPU: amd-llama-135m, batch 16 x 2048
    python benchmarks/train_gpu.py --device cpu --tiny   # smoke test of the script itself

MFU = tokens/s x (6 N + 12 L H Q T) / peak, N = matmul parameters (input embedding excluded),
L layers, H heads, Q head dim, T sequence length (PaLM, appendix B); peak = the device's dense
bf16 peak (H200/H100 SXM: 989 TFLOP/s) from slm.train.metrics, or --peak-tflops.
Anchors: AMD's own run ~20% MFU on MI250; llm.c GPT-2 124M ~38% on H100; goal >= 45% on H200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def make_step(model, optimizer, x, y, device, amp_dtype):
    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="amd-llama-135m")
    ap.add_argument("--tiny", action="store_true", help="tiny config, batch 2 x 64: a CPU smoke test")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch (sequences)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss-chunk", type=int, default=-1, help="fused-loss rows per chunk (-1 auto, 0 plain logits)")
    ap.add_argument("--variants", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if args.tiny:
        args.config, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 64, 3, 1

    from slm.config import get_config
    from slm.train.loop import build_optimizer
    from slm.train.loss import LanguageModel
    from slm.train.metrics import flops_per_token, peak_flops
    from slm.train.recipes import resolve

    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # fp32 on CPU, as the trainer does
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = get_config(args.config)
    cfg = resolve("amd-pretrain", model=args.config, data="-", out="-")
    peak, peak_source = peak_flops(device, args.peak_tflops)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    steps = {}
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = LanguageModel(config)
        model.init_weights(torch.Generator().manual_seed(cfg.seed))
        model.loss_chunk = args.loss_chunk
        model.to(device)
        if variant == "compile":
            for block in model.layers:
                block.compile()
        elif variant != "eager":
            raise SystemExit(f"unknown variant {variant!r}")
        steps[variant] = make_step(model, build_optimizer(model, cfg, device), x, y, device, amp_dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_warm = time.perf_counter()
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
        sync()
    print(f"warm-up (incl. compile) {time.perf_counter() - t_warm:.1f}s")
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            loss = step().detach()
            sync()
            times[name].append(time.perf_counter() - t0)
    fpt = flops_per_token(config, args.seq)
    n_tok = args.batch * args.seq
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{config.name} ({config.num_params() / 1e6:.1f}M params) on {dev_name}, batch {args.batch} x {args.seq}, "
          f"{'bf16 autocast' if amp_dtype else 'fp32'}; {fpt / 1e9:.3f} GFLOP/token; peak {peak / 1e12:.4g} TFLOP/s "
          f"({peak_source}); last loss {float(loss):.4f}")
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tok_s = n_tok / med
        results[name] = {"ms_per_step": med * 1e3, "tokens_per_s": tok_s, "mfu": tok_s * fpt / peak}
        print(f"{name:>8}: {med * 1e3:9.1f} ms/step  {tok_s:12,.0f} tokens/s  MFU {tok_s * fpt / peak:6.1%}")
    if device.type == "cuda":
        print(f"max memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"load average {tuple(round(v, 2) for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.name, "batch": args.batch, "seq": args.seq, "device": dev_name,
                       "peak_flops": peak, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
