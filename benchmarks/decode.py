"""Batch-1 greedy decoding: slm vs transformers.generate, same weights, one process.

    python benchmarks/decode.py --threads 2                    # every case
    python benchmarks/decode.py --threads 1 --model amd-llama-135m --context short
    python benchmarks/decode.py --quantize int8                # adds an slm int8 row per case

Cases: SmolLM2-135M-Instruct (the real GGUF, imported) and amd-llama-135m (random weights,
AMD init), each with a 32-token and a ~2000-token prompt. Runs are interleaved
(slm, transformers, slm, ...) after a warm-up; medians are reported. Decode speed is timed
from the first new token to the last (prefill excluded) for both engines, through a token
callback (slm) and a logits processor (transformers). The fp32 tokens must be identical.

The bandwidth bound: a decode step must read every weight once (and the KV cache), so
tokens/s <= memory bandwidth / bytes per token; bandwidth is measured here, between the runs.

    python benchmarks/decode.py --peer llamacpp --threads 1    # llama.cpp as the peer (needs
    python benchmarks/decode.py --peer llamacpp --threads 2    #   bash benchmarks/setup_llamacpp.sh)
    python benchmarks/decode.py --contention                   # one busy process: default vs fixed threads

--peer llamacpp: the same weights exported with `slm export --format gguf` (f32, q8_0, q4_0) and
run by llama-bench (its tg rate: single-token decode steps after a prefill of the context, which
is not timed) beside slm fp32 / int8 / int4 (`--quantize`), interleaved round by round with the
bandwidth probe; each with its bound (bandwidth / bytes a step reads) and the fraction reached.
First, the exported f32 file run greedily in llama-server must give slm's greedy tokens.
--contention: starts one `while 1: pass` process, then times slm's default thread choice
(slm.threads, chosen afresh each round as a new `slm generate` would) against every fixed count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from slm.threads import set_threads  # noqa: E402


def measure_bandwidth(repeats: int = 3) -> float:
    """Bytes/s of reading 512 MiB of fp32 as 64 separate 8 MiB tensors (sums: read-only, like the
    weight stream of a decode step, which is also many separately allocated tensors; one huge
    tensor reads measurably slower on this machine and would understate the bound)."""
    xs = [torch.ones(2 * 1024 * 1024) for _ in range(64)]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for x in xs:
            x.sum()
        times.append(time.perf_counter() - t0)
    return 64 * xs[0].numel() * 4 / statistics.median(times[1:])  # the first pass pages memory in


def bytes_per_token(model, kv_len: int) -> int:
    """Weight bytes one decode step reads (the embedding row aside; a tied lm_head reads it all)
    plus the KV cache it attends over."""
    c = model.config
    seen, total = set(), 0
    for name, module in model.named_modules():
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            # The embedding lookup reads one row; a tied lm_head still reads it all, as output.weight.
            if id(p) in seen or name == "tok_embeddings" or "kv_cache" in name or p.dim() == 0:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * kv_len * 4
    return total + kv


# --- the two engines ------------------------------------------------------------------------


def run_ours(model, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """-> (tokens, decode tokens/s (first to last new token), total seconds)."""
    from slm.generate import Stop, generate

    stamps = []
    res = generate(model, prompt, n, stop=Stop(), on_token=lambda t, from_draft: stamps.append(time.perf_counter()))
    return res.tokens, (len(stamps) - 1) / (stamps[-1] - stamps[0]), res.seconds


def run_hf(model, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):  # called once per new token, right after that step's forward
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]), eos_token_id=None, pad_token_id=0,
        )
    total = time.perf_counter() - t0
    return out[0, len(prompt):].tolist(), (len(stamps) - 1) / (stamps[-1] - stamps[0]), total


# --- cases ----------------------------------------------------------------------------------


def load_case(name: str):
    """-> (slm model, transformers model, tokenizer or None)."""
    import transformers

    from slm.load import load_model
    from slm.weights import slm_to_hf

    if name == "smollm2":
        from slm.assets import smollm2_gguf
        from slm.gguf_import import cached_import
        from slm.tokenizer import Tokenizer

        model_dir = cached_import(smollm2_gguf())
        ours = load_model(model_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        return ours, hf.eval(), Tokenizer.load(model_dir)
    from slm.config import get_config
    from slm.model import Transformer

    config = get_config(name)
    ours = Transformer(config)
    ours.init_weights(torch.Generator().manual_seed(0))
    ours.eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    hf.load_state_dict(slm_to_hf(ours.state_dict(), config), strict=True)
    return ours, hf.eval(), None


def make_prompt(tokenizer, vocab_size: int, length: int) -> list[int]:
    """Real text (stdlib source) when the model has a tokenizer, else seeded random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(length)
        return torch.randint(3, vocab_size, (length,), generator=g).tolist()
    import sysconfig

    text = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()
    ids = tokenizer.encode(text)
    return ids[:length]


def bench_case(engines: dict, prompt: list[int], n: int, repeats: int, warmup: int) -> tuple[dict, float]:
    """-> (per engine: median decode tokens/s, median total seconds, tokens), median bandwidth (B/s)."""
    results = {k: [] for k in engines}
    tokens, bandwidth = {}, []
    for r in range(warmup + repeats):
        for name, fn in engines.items():  # interleaved: A, B, (C,) A, B, ...
            toks, tps, total = fn(prompt, n)
            tokens[name] = toks
            if r >= warmup:
                results[name].append((tps, total))
        if r >= warmup:  # the bound under the same load as the runs beside it
            bandwidth.append(measure_bandwidth())
    return {
        name: {
            "decode_tok_s": statistics.median(t for t, _ in runs),
            "total_s": statistics.median(s for _, s in runs),
            "tokens": tokens[name],
        }
        for name, runs in results.items()
    }, statistics.median(bandwidth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=["smollm2", "amd-llama-135m", "all"], default="all")
    ap.add_argument("--context", choices=["short", "long", "all"], default="all")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quantize", choices=["int8"], default=None, help="add an slm int8 row (vs transformers fp32)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--peer", choices=["transformers", "llamacpp"], default="transformers",
                    help="the engine slm is compared with (llamacpp: fp32/int8/int4 vs F32/Q8_0/Q4_0)")
    ap.add_argument("--contention", action="store_true",
                    help="one busy background process: slm's default thread choice vs each fixed count")
    args = ap.parse_args()

    if args.contention:
        return contention_main(args)
    if args.peer == "llamacpp":
        return llamacpp_main(args)
    set_threads(args.threads)  # pinned, as `--threads N` pins slm's native kernels
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"threads={args.threads} torch={torch.__version__} loadavg={os.getloadavg()}", flush=True)
    models = ["smollm2", "amd-llama-135m"] if args.model == "all" else [args.model]
    contexts = {"short": 32, "long": 1950}
    contexts = contexts if args.context == "all" else {args.context: contexts[args.context]}
    for name in models:
        ours, hf, tok = load_case(name)
        int8 = None
        if args.quantize == "int8":
            from slm.quantize import quantized_copy

            int8 = quantized_copy(ours)
        for ctx, length in contexts.items():
            prompt = make_prompt(tok, ours.config.vocab_size, length)
            engines = {
                "slm": lambda p, n: run_ours(ours, p, n),
                "transformers": lambda p, n: run_hf(hf, p, n),
            }
            if int8 is not None:
                engines["slm-int8"] = lambda p, n: run_ours(int8, p, n)
            r, bw = bench_case(engines, prompt, args.new_tokens, args.repeats, args.warmup)
            if r["slm"]["tokens"] != r["transformers"]["tokens"]:
                raise SystemExit(f"{name}/{ctx}: slm and transformers generated different tokens")
            kv_len = len(prompt) + args.new_tokens // 2
            bound = bw / bytes_per_token(ours, kv_len)
            hf_tps = r["transformers"]["decode_tok_s"]
            row = {
                "model": name, "context": len(prompt), "threads": args.threads,
                "slm_tok_s": round(r["slm"]["decode_tok_s"], 2), "hf_tok_s": round(hf_tps, 2),
                "ratio": round(r["slm"]["decode_tok_s"] / hf_tps, 3),
                "bandwidth_gb_s": round(bw / 1e9, 1), "bound_tok_s": round(bound, 1),
                "slm_of_bound": round(r["slm"]["decode_tok_s"] / bound, 3),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
            if int8 is not None:
                q = r["slm-int8"]
                same = sum(a == b for a, b in zip(q["tokens"], r["slm"]["tokens"])) / len(q["tokens"])
                row.update(int8_tok_s=round(q["decode_tok_s"], 2), int8_ratio=round(q["decode_tok_s"] / hf_tps, 3),
                           int8_same_tokens=round(same, 3))
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                extra = (f"  int8 {row['int8_tok_s']:6.1f} tok/s ({row['int8_ratio']:.2f}x, "
                         f"{row['int8_same_tokens']:.0%} same tokens)" if int8 is not None else "")
                print(f"{name:15s} ctx {len(prompt):5d}: slm {row['slm_tok_s']:6.1f} tok/s  transformers "
                      f"{row['hf_tok_s']:6.1f} tok/s  ratio {row['ratio']:.2f}x  bound {bound:6.1f} tok/s "
                      f"({row['bandwidth_gb_s']} GB/s) "
                      f"(slm at {row['slm_of_bound']:.0%}){extra}  loadavg {row['loadavg']}", flush=True)
        del ours, hf, int8


# --- llama.cpp as the peer (--peer llamacpp) ------------------------------------------------


def load_slm_case(name: str):
    """-> (slm model, tokenizer or None, model directory or None): the real SmolLM2, or a registered
    shape with random weights (AMD init), without a transformers copy."""
    from slm.config import get_config
    from slm.model import Transformer

    if name == "smollm2":
        from slm.assets import smollm2_gguf
        from slm.gguf_import import cached_import
        from slm.tokenizer import Tokenizer
        from slm.load import load_model

        model_dir = cached_import(smollm2_gguf())
        return load_model(model_dir), Tokenizer.load(model_dir), model_dir
    ours = Transformer(get_config(name))
    ours.init_weights(torch.Generator().manual_seed(0))
    return ours.eval(), None, None


def _with_tokenizer(name: str, ours, tmp: Path) -> Path:
    """A model directory holding `ours` (random weights) with the LLaMA-2 tokenizer, to export as GGUF."""
    from slm.assets import llama2_vocab_gguf
    from slm.gguf_import import read_tokenizer
    from slm.weights import save_model

    vocab = llama2_vocab_gguf()
    if vocab is None:  # the amd shape has the LLaMA-2 vocabulary; llama.cpp needs some tokenizer in the file
        raise SystemExit("the amd-llama-135m case needs the LLaMA-2 vocabulary: python scripts/fetch_llama2_vocab.py")
    tok = tmp / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    read_tokenizer(vocab).save(str(tok / "tokenizer.json"))
    return save_model(ours, tmp / name, tokenizer_dir=tok)


def gguf_bytes_per_token(path: Path, kv_len: int, config) -> int:
    """What llama.cpp reads per decode step: every tensor of the file but the embedding table
    (one row of it; unless it is also the lm_head, as when output.weight is absent), plus its
    KV cache (f16 by default)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)
    return total + 2 * config.n_layers * config.n_kv_heads * config.head_dim * kv_len * 2


def llamacpp_case(name: str, args, tmp: Path) -> None:
    import _llamacpp

    from slm.gguf_export import export_gguf
    from slm.quantize import draft_copy, quantized_copy

    ours, tok, model_dir = load_slm_case(name)
    model_dir = model_dir or _with_tokenizer(name, ours, tmp)
    ggufs = {q: export_gguf(model_dir, tmp / f"{name}-{q}.gguf", dtype=q, progress=False)
             for q in ("f32", "q8_0", "q4_0")}
    variants = {"fp32": (ours, "f32"), "int8": (quantized_copy(ours), "q8_0"), "int4": (draft_copy(ours), "q4_0")}

    # The exported f32 file, run greedily by llama.cpp, must give slm's greedy tokens.
    prompt = make_prompt(tok, ours.config.vocab_size, 32)
    with _llamacpp.Server(ggufs["f32"], threads=args.threads) as server:
        theirs, _, _ = server.complete(prompt, args.new_tokens)
    mine = run_ours(ours, prompt, args.new_tokens)[0]
    if theirs != mine:
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        raise SystemExit(f"{name}: llama.cpp's greedy tokens from the exported f32 GGUF differ from slm's "
                         f"at new token {same}")
    print(f"{name}: llama.cpp (exported f32 GGUF) gives slm's {len(mine)} greedy tokens", flush=True)

    contexts = {"short": 32, "long": 1950}
    contexts = contexts if args.context == "all" else {args.context: contexts[args.context]}
    for ctx, length in contexts.items():
        prompt = make_prompt(tok, ours.config.vocab_size, length)
        runs = {f"slm {v}": [] for v in variants} | {f"llama.cpp {q}": [] for _, q in variants.values()}
        bandwidth = []
        for r in range(args.warmup + args.repeats):
            for v, (model, q) in variants.items():  # interleaved: slm fp32, llama.cpp F32, slm int8, ...
                tps_ours = run_ours(model, prompt, args.new_tokens)[1]
                tps_theirs = _llamacpp.decode_tok_s(ggufs[q], args.threads, n_gen=args.new_tokens,
                                                    depth=len(prompt))
                if r >= args.warmup:
                    runs[f"slm {v}"].append(tps_ours)
                    runs[f"llama.cpp {q}"].append(tps_theirs)
            if r >= args.warmup:
                bandwidth.append(measure_bandwidth())
        bw = statistics.median(bandwidth)
        kv_len = len(prompt) + args.new_tokens // 2
        for v, (model, q) in variants.items():
            a, b = statistics.median(runs[f"slm {v}"]), statistics.median(runs[f"llama.cpp {q}"])
            bound_a = bw / bytes_per_token(model, kv_len)
            bound_b = bw / gguf_bytes_per_token(ggufs[q], kv_len, ours.config)
            row = {"model": name, "context": len(prompt), "threads": args.threads, "slm": v, "llamacpp": q.upper(),
                   "slm_tok_s": round(a, 2), "llamacpp_tok_s": round(b, 2), "ratio": round(a / b, 3),
                   "bandwidth_gb_s": round(bw / 1e9, 1), "slm_bound_tok_s": round(bound_a, 1),
                   "slm_of_bound": round(a / bound_a, 3), "llamacpp_bound_tok_s": round(bound_b, 1),
                   "llamacpp_of_bound": round(b / bound_b, 3), "loadavg": [round(x, 2) for x in os.getloadavg()]}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{name:15s} ctx {len(prompt):5d} t{args.threads}: slm {v:4s} {a:6.1f} tok/s "
                      f"({row['slm_of_bound']:.0%} of {bound_a:.0f})  llama.cpp {q.upper():4s} {b:6.1f} tok/s "
                      f"({row['llamacpp_of_bound']:.0%} of {bound_b:.0f})  ratio {row['ratio']:.2f}x  "
                      f"{row['bandwidth_gb_s']} GB/s  loadavg {row['loadavg']}", flush=True)


def llamacpp_main(args) -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    set_threads(args.threads)  # pinned: the same count as llama.cpp's -t
    print(f"threads={args.threads} torch={torch.__version__} peer=llama.cpp loadavg={os.getloadavg()}", flush=True)
    models = ["smollm2", "amd-llama-135m"] if args.model == "all" else [args.model]
    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            llamacpp_case(name, args, Path(tmp))


# --- contention (--contention) --------------------------------------------------------------


def contention_main(args) -> None:
    """One busy background process (started and stopped here); slm's default thread choice against
    every fixed thread count, interleaved round by round, medians."""
    import subprocess

    from slm.threads import usable_cores

    name = "smollm2" if args.model == "all" else args.model
    ours, tok, _ = load_slm_case(name)
    prompt = make_prompt(tok, ours.config.vocab_size, 32)
    fixed = list(range(1, usable_cores() + 1))
    print(f"contention: {name}, one busy process, fixed threads {fixed}, loadavg before {os.getloadavg()}", flush=True)
    busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(1.0)
        runs = {"default": [], **{t: [] for t in fixed}}
        chosen = []
        for r in range(args.warmup + args.repeats):
            for key in runs:
                # default: what a new `slm generate` does (free cores for PyTorch, the native kernels
                # adapting by measurement); fixed: `--threads n`
                n = set_threads(None if key == "default" else key)
                tps = run_ours(ours, prompt, args.new_tokens)[1]
                if r >= args.warmup:
                    runs[key].append(tps)
                    if key == "default":
                        chosen.append(n)
        load = os.getloadavg()
    finally:
        busy.kill()
        busy.wait()
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = max(med[t] for t in fixed)
    row = {"model": name, "case": "contention", "default_threads_chosen": chosen,
           "default_tok_s": round(med["default"], 2), **{f"threads_{t}_tok_s": round(med[t], 2) for t in fixed},
           "default_of_best_fixed": round(med["default"] / best, 3),
           "default_over_threads_1": round(med["default"] / med[1], 3), "loadavg": [round(x, 2) for x in load]}
    print(json.dumps(row) if args.json else
          "  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
