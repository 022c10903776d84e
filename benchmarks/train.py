"""Training throughput on CPU: slm's trainer step vs transformers.LlamaForCausalLM.

Same config, same initial weights, same batch, AdamW with the same hyperparameters, fp32.
One step = forward + loss + backward + AdamW step. Checks that the first losses agree
(1e-5 relative), then times the two interleaved (A, B, A, B, ...) after a warm-up and
prints medians, tokens/s, the ratio, CPU-MFU against a fp32 GEMM peak measured in the same
run, and the load average.

    python benchmarks/train.py                     # llama-16m, batch 4 x 256
    OMP_NUM_THREADS=1 python benchmarks/train.py   # steadier on a shared machine
    python benchmarks/train.py --loss-chunk 0      # ablation: slm with plain full logits
    python benchmarks/train.py --config amd-llama-135m --batch 1 --seq 256 --rounds 4

MFU uses slm.train.metrics.flops_per_token: 6 N + 12 L H Q T per token (N: matmul parameters).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def build(config_name: str, seed: int, loss_chunk: int):
    import transformers

    from slm.config import get_config
    from slm.train.loss import LanguageModel
    from slm.weights import slm_to_hf

    config = get_config(config_name)
    ours = LanguageModel(config)
    ours.init_weights(torch.Generator().manual_seed(seed))
    ours.loss_chunk = loss_chunk
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    sd = slm_to_hf({k: v.detach().clone() for k, v in ours.state_dict().items()}, config)
    hf.load_state_dict(sd, strict=not config.tie_embeddings)  # tied: lm_head is the embedding itself
    if config.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return config, ours, hf


def adamw(model):
    # The trainer's AdamW (decay on matrices only) for both, so the optimizer work is identical.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-16m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8, help="timed steps of each, interleaved")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss-chunk", type=int, default=-1, help="slm's fused-loss chunk (-1 auto, 0 plain logits)")
    args = ap.parse_args()

    from slm.train.metrics import flops_per_token, measure_gemm_peak

    torch.manual_seed(0)
    config, ours, hf = build(args.config, 0, args.loss_chunk)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    opt_ours, opt_hf = adamw(ours), adamw(hf)

    def step_ours():
        loss = ours(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_hf():
        # shift_labels: transformers' own loss on exactly our (input, target) pairs, no extra position.
        loss = hf(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    # First losses: the same weights, tokens and targets must give the same loss.
    with torch.no_grad():
        l_ours = ours(x, y).item()
        l_hf = hf(input_ids=x, labels=y, shift_labels=y).loss.item()
    rel = abs(l_ours - l_hf) / abs(l_hf)
    print(f"config {config.name}: {config.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.seq}, "
          f"fp32, {torch.get_num_threads()} threads")
    print(f"first loss: slm {l_ours:.7f}  transformers {l_hf:.7f}  rel diff {rel:.2e}")
    if rel > 1e-5:
        raise SystemExit("first losses differ by more than 1e-5 relative")

    for _ in range(args.warmup):
        step_ours()
        step_hf()
    peak_before = measure_gemm_peak(torch.device("cpu"))
    times = {"slm": [], "transformers": []}
    for _ in range(args.rounds):
        for name, fn in (("slm", step_ours), ("transformers", step_hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    peak = max(peak_before, measure_gemm_peak(torch.device("cpu")))
    n_tok = args.batch * args.seq
    fpt = flops_per_token(config, args.seq)
    print(f"fp32 GEMM peak (1024^3, best of the run): {peak / 1e9:.1f} GFLOP/s; model {fpt / 1e6:.1f} MFLOP/token")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        tok_s = n_tok / med[name]
        print(f"{name:>12}: median {med[name] * 1e3:8.1f} ms/step  {tok_s:9.0f} tokens/s  "
              f"CPU-MFU {tok_s * fpt / peak:6.1%}   (min {min(ts) * 1e3:.1f} ms, max {max(ts) * 1e3:.1f} ms)")
    print(f"speed-up slm / transformers: {med['transformers'] / med['slm']:.2f}x   "
          f"load average {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
