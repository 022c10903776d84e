"""Speculative decoding: slm vs transformers assisted generation, same pairs, one process.

    python benchmarks/speculative.py                     # everything, part 2 short (about 25 minutes)
    python benchmarks/speculative.py --part controlled   # part 1 only (pairs, then the useless draft)
    python benchmarks/speculative.py --part real --prompts 20 --new-tokens 128 --repeats 1   # the full part 2

Part 1, a controlled pair (the engine itself is measured): the draft is SmolLM2-135M-Instruct
cut to its first --draft-layers layers; the target is that draft plus the remaining layers with
their output projections (wo, w2) zeroed, so each appended layer is the identity and the
target's logits equal the draft's (acceptance 1); then the same with N(0, --noise) in those
projections (acceptance < 1). Constant K in --ks. For slm and for transformers.generate
(assistant_model, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0):
speedup over each one's own target-only decoding, and efficiency = speedup / predicted, with
predicted = (1 - a^(K+1)) / ((1 - a)(K c + 1)) from the measured per-token acceptance a
(Leviathan's alpha, solved from the measured tokens per target forward; AMD's acceptance rate,
accepted / drafted, is printed beside it) and each
engine's own cost ratio c (draft-only / target-only time per token). Also the cost v of one
verify forward over K+1 tokens relative to a 1-token decode step, for both engines, and the
efficiency against the prediction that uses v instead of 1 (what is left is loop overhead),
and slm's verify forward in GFLOP/s beside this core's fp32 matmul peak (near it, verifying
K+1 tokens is compute-bound: v cannot fall further, whatever the engine).
Then a useless draft: the real SmolLM2 as target, its own first --draft-layers layers as draft
(they agree on a few % of tokens), slm at K=auto (it must back off: never slower than
target-only) beside transformers' adaptive "heuristic" schedule.

Part 2, the real thing: target SmolLM2-135M-Instruct, greedy, the first --prompts HumanEval
prompts in slm.eval's chat format (asked for the completed function, the instruct model
answers with a code block), --new-tokens each, every draft
slm offers on a CPU: prompt lookup (ngram), the target's own quantized copy (int8; int4, i.e.
int4 decoder layers and an int8 lm_head), and "auto" (lookup, else the int4 copy), at "auto" K
(and a fixed K for ngram and int4). transformers rows: prompt lookup (prompt_lookup_num_tokens) and, as its
nearest int8 draft, the target under torch.ao dynamic int8 quantisation as assistant.

With --llamacpp (after `bash benchmarks/setup_llamacpp.sh`), part 2 also runs llama.cpp on the same
weights (exported with `slm export --format gguf`, target F32) through llama-server, one server per
speculative setting: target-only, each of its n-gram modes (ngram-simple, ngram-map-k, ngram-mod,
ngram-cache) and a draft GGUF (the target itself in Q4_0 or Q8_0, llama.cpp's analogue of slm's
quantized self-draft), beside slm's best drafts; reported: slm's best over llama.cpp's best in wall time.

Every speculative output is asserted equal to the same engine's target-only greedy output.
Runs are interleaved (A, B, C, ... then again) after a warm-up; load average printed. Speedups
and cost ratios are medians over rounds of each round's own ratio (the engines of one round ran
back to back, so load that changes between rounds cancels); their range over rounds is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def interleaved(engines: dict, prompts: list, repeats: int) -> dict:
    """engines: name -> fn(prompt) -> (tokens, stats). One warm-up each, then `repeats` rounds of
    every engine on every prompt in turn (in reverse order on odd rounds). -> name -> {"seconds": median total over the prompts,
    "rounds": each round's total, "tokens": per prompt, "stats": per prompt (last round)}."""
    for fn in engines.values():
        fn(prompts[0])
    times = {name: [] for name in engines}
    out = {name: {"tokens": [], "stats": []} for name in engines}
    for r in range(repeats):
        totals = dict.fromkeys(engines, 0.0)
        # Odd rounds run the engines in reverse order: whoever runs first after another engine
        # (caches, clocks) gets no systematic edge.
        order = list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]
        for i, prompt in enumerate(prompts):
            for name, fn in order:
                t0 = time.perf_counter()
                toks, stats = fn(prompt)
                totals[name] += time.perf_counter() - t0
                if r == repeats - 1:
                    out[name]["tokens"].append(toks)
                    out[name]["stats"].append(stats)
        for name in engines:
            times[name].append(totals[name])
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {t:.2f}s" for n, t in totals.items()))
    for name in engines:
        out[name]["seconds"] = statistics.median(times[name])
        out[name]["rounds"] = times[name]
    return out


def ratios(res: dict, num: str, den: str) -> list[float]:
    """Each round's time of engine `num` over engine `den`. The engines of one round ran back to
    back on the same prompts, so a change of load on this shared machine between rounds cancels
    out of these ratios (it does not cancel out of a ratio of two medians)."""
    return [a / b for a, b in zip(res[num]["rounds"], res[den]["rounds"])]


def ratio(res: dict, num: str, den: str) -> float:
    """The median over rounds of `ratios`."""
    return statistics.median(ratios(res, num, den))


def alpha_from_rounds(tokens_per_round: float, k: int) -> float:
    """Leviathan's per-token acceptance alpha that yields this mean tokens per round at draft length k,
    i.e. the root of (1 - a^(k+1)) / (1 - a) = tokens_per_round (by bisection; the left side increases in a).
    AMD's acceptance rate (accepted / drafted) is not alpha: it is lower at larger k."""
    from slm.speculative import expected_tokens

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(k, mid) < tokens_per_round:
            lo = mid
        else:
            hi = mid
    return lo


# --- engines -------------------------------------------------------------------------------------


def ours_plain(model, n):
    from slm.generate import Stop, generate

    return lambda p: (generate(model, p, n, stop=Stop()).tokens, {})


def ours_spec(target, draft, n, k):
    from slm.generate import Stop, generate

    def run(p):
        r = generate(target, p, n, draft=draft, draft_tokens=k, stop=Stop())
        return r.tokens, r.stats

    return run


def hf_run(model, n, **kw):
    def run(p):
        ids = torch.tensor([p])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0, eos_token_id=None, **kw,
        )
        return out[0, len(p):].tolist(), {}

    return run


def hf_assisted(target, draft, n, k):
    return hf_run(target, n, assistant_model=draft, num_assistant_tokens=k,
                  num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)


# --- models --------------------------------------------------------------------------------------


def load_smollm2():
    """-> (slm model, model dir) of the real SmolLM2-135M-Instruct."""
    from slm.assets import smollm2_gguf
    from slm.gguf_import import cached_import
    from slm.load import load_model

    model_dir = cached_import(smollm2_gguf())
    return load_model(model_dir), model_dir


def to_hf(model, tmp: Path, name: str):
    from transformers import AutoModelForCausalLM

    from slm.weights import save_model

    return AutoModelForCausalLM.from_pretrained(str(save_model(model, tmp / name)), dtype=torch.float32).eval()


@torch.no_grad()
def controlled_pair(full, draft_layers: int, noise: float, seed: int = 0):
    """(draft, target): draft = full's first layers; target = draft + full's other layers with wo/w2 = noise."""
    from slm.weights import build_model

    sd = full.state_dict()
    keep = lambda k: not k.startswith("layers.") or int(k.split(".")[1]) < draft_layers  # noqa: E731
    draft = build_model(full.config.replace(n_layers=draft_layers), {k: v for k, v in sd.items() if keep(k)})
    g = torch.Generator().manual_seed(seed)
    tsd = dict(sd)
    for k, v in sd.items():
        if k.startswith("layers.") and int(k.split(".")[1]) >= draft_layers and k.endswith(("wo.weight", "w2.weight")):
            tsd[k] = noise * torch.randn(v.shape, generator=g)
    target = build_model(full.config, {k: v.clone() for k, v in tsd.items()})
    return draft, target


def humaneval_prompts(tokenizer, count: int, model_dir, prompt_format: str = "chat") -> list[list[int]]:
    """The first `count` HumanEval problems as slm's HumanEval evaluation prompts them ("chat": the
    instruct model is asked for the completed function, and answers with code)."""
    from slm.eval.humaneval import read_problems
    from slm.eval.humaneval_generate import build_prompt

    problems = list(read_problems().values())[:count]
    return [tokenizer.encode(build_prompt(p, prompt_format, model_dir)) for p in problems]


# --- verify cost ---------------------------------------------------------------------------------


def verify_cost(lm, prompt: list[int], ks: list[int], repeats: int = 15) -> dict[int, float]:
    """Median seconds of a forward over K+1 tokens, at the same position: {K: seconds}, K=0 the decode step."""
    lm.prepare(len(prompt) + 64)
    lm.forward(prompt, 0)
    pos = len(prompt)
    times = {t: [] for t in [1] + [k + 1 for k in ks]}
    for _ in range(repeats):
        for t in times:
            t0 = time.perf_counter()
            lm.forward(prompt[:t], pos)  # overwrites positions pos..pos+t-1 (a crop for transformers)
            times[t].append(time.perf_counter() - t0)
    return {t - 1: statistics.median(v) for t, v in times.items()}


def sgemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This core's fp32 matmul throughput on a large square product: the ceiling a verify forward
    over K+1 tokens runs into once it stops being bound by reading the weights."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:]) / 1e9


def linears(model) -> list:
    """Every linear a forward multiplies each token by, in order (the lm_head included)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@torch.inference_mode()
def matmul_seconds(model, tokens: int, repeats: int = 15) -> float:
    """Median seconds of the matmuls alone of a forward over `tokens` tokens: every linear of the
    model run in turn on (tokens, in_features) inputs, through the same kernels as the forward
    (after `slm.pack.pack`, oneDNN's packed weights). The rest of a forward is small ops."""
    mods = linears(model)
    xs = {m.in_features: torch.randn(tokens, m.in_features) for m in mods}
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for m in mods:
            m(xs[m.in_features])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# --- the two parts -------------------------------------------------------------------------------


def short_prompts(args, tokenizer, model_dir, count: int) -> list[list[int]]:
    """Part 1's prompts: the last --controlled-prompt-tokens of each HumanEval prompt. Part 1
    measures decoding; a long prefill (the same work for every engine, plus the draft's own)
    would only dilute every speedup."""
    return [p[-args.controlled_prompt_tokens :] for p in
            humaneval_prompts(tokenizer, count, model_dir, args.prompt_format)]


def part_controlled(args, full, model_dir, tokenizer, tmp: Path) -> list[dict]:
    from slm.speculative import HFLM, SlmLM, predicted_speedup

    prompts = short_prompts(args, tokenizer, model_dir, args.controlled_prompts)
    n = args.controlled_tokens
    rows = []
    for label, noise in (("zero", 0.0), (f"noise {args.noise:g}", args.noise)):
        draft, target = controlled_pair(full, args.draft_layers, noise)
        hf_draft, hf_target = to_hf(draft, tmp, "draft"), to_hf(target, tmp, "target")
        engines = {"slm target": ours_plain(target, n), "slm draft": ours_plain(draft, n),
                   "hf target": hf_run(hf_target, n), "hf draft": hf_run(hf_draft, n)}
        for k in args.ks:
            engines[f"slm K={k}"] = ours_spec(target, draft, n, k)
            engines[f"hf K={k}"] = hf_assisted(hf_target, hf_draft, n, k)
        log(f"part 1, target {label}: {len(engines)} engines x {len(prompts)} prompts x {args.repeats} rounds")
        res = interleaved(engines, prompts, args.repeats)
        for eng in ("slm", "hf"):
            ref = res[f"{eng} target"]["tokens"]
            for k in args.ks:
                assert res[f"{eng} K={k}"]["tokens"] == ref, f"{eng} K={k}: output differs from target-only greedy"
        vc = {"slm": verify_cost(SlmLM(target), prompts[0], args.ks), "hf": verify_cost(HFLM(hf_target), prompts[0], args.ks)}
        peak, flops_per_token = sgemm_peak_gflops(), 2 * sum(m.weight.numel() for m in linears(target))
        for k in args.ks:
            st = res[f"slm K={k}"]["stats"]
            rate = sum(s["draft_n_accepted"] for s in st) / sum(s["draft_n"] for s in st)
            # Tokens per verify round (the first new token comes from the prefill, not from a round).
            per_round = sum(s["tokens_per_round"] * s["rounds"] for s in st) / sum(s["rounds"] for s in st)
            a = 1.0 if rate == 1.0 else alpha_from_rounds(per_round, k)
            row = {"part": "controlled", "target": label, "K": k, "acceptance": round(rate, 3), "alpha": round(a, 3)}
            speedups = {eng: ratios(res, f"{eng} target", f"{eng} K={k}") for eng in ("slm", "hf")}
            for eng in ("slm", "hf"):
                c = ratio(res, f"{eng} draft", f"{eng} target")
                speedup = statistics.median(speedups[eng])
                pred = predicted_speedup(a, k, c)
                row.update({f"{eng}_c": round(c, 3), f"{eng}_speedup": round(speedup, 3),
                            f"{eng}_speedup_range": [round(min(speedups[eng]), 3), round(max(speedups[eng]), 3)],
                            f"{eng}_predicted": round(pred, 3), f"{eng}_efficiency": round(speedup / pred, 3),
                            f"{eng}_verify_cost": round(vc[eng][k] / vc[eng][0], 3),
                            # the same prediction with the measured verify cost instead of 1 step
                            f"{eng}_efficiency_given_verify": round(
                                speedup / predicted_speedup(a, k, c, vc[eng][k] / vc[eng][0]), 3),
                            f"{eng}_step_ms": round(1e3 * vc[eng][0], 1), f"{eng}_verify_ms": round(1e3 * vc[eng][k], 1)})
            # The verify forward's matmul rate against this core's fp32 peak: near it, a verify over
            # K+1 tokens is compute-bound and cannot cost less, whatever the engine.
            row["slm_verify_gflops"] = round(flops_per_token * (k + 1) / vc["slm"][k] / 1e9, 1)
            row["sgemm_peak_gflops"] = round(peak, 1)
            # slm's speedup over transformers' speedup, each round's pair of speedups compared
            rel = [ours / theirs for ours, theirs in zip(speedups["slm"], speedups["hf"])]
            row["slm_speedup_over_hf_speedup"] = round(statistics.median(rel), 3)
            row["slm_vs_hf"] = round(ratio(res, f"hf K={k}", f"slm K={k}"), 3)  # wall time
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def part_bound(args, full) -> list[dict]:
    """What a verify over K+1 tokens must cost on this machine, without transformers or generation
    (a minute): for the controlled pair's target, the forward over K+1 tokens in decode steps (v),
    its matmuls alone in GFLOP/s against the core's fp32 peak, and the ceiling of the efficiency
    that v leaves an engine with no other cost, (K c + 1) / (K c + v), with c here the draft's
    forward over the target's (one token each)."""
    from slm.speculative import SlmLM

    draft, target = controlled_pair(full, args.draft_layers, 0.0)
    prompt = list(range(1000, 1000 + args.controlled_prompt_tokens))
    vt, vd = verify_cost(SlmLM(target), prompt, args.ks), verify_cost(SlmLM(draft), prompt, [])
    c, peak = vd[0] / vt[0], sgemm_peak_gflops()
    flops_per_token = 2 * sum(m.weight.numel() for m in linears(target))
    rows = []
    for k in args.ks:
        v = vt[k] / vt[0]
        row = {"part": "bound", "K": k, "verify_cost": round(v, 3), "c_forward": round(c, 3),
               "verify_gflops": round(flops_per_token * (k + 1) / vt[k] / 1e9, 1),
               "verify_matmul_gflops": round(flops_per_token * (k + 1) / matmul_seconds(target, k + 1) / 1e9, 1),
               "sgemm_peak_gflops": round(peak, 1), "efficiency_ceiling": round((k * c + 1) / (k * c + v), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_acceptance(args, full, model_dir, tokenizer) -> list[dict]:
    """slm's acceptance rate on the noisy pair for each --noises value, prompt and K (greedy,
    --controlled-tokens each): how the noise level sets the pair's acceptance."""
    from slm.generate import Stop, generate

    prompts = short_prompts(args, tokenizer, model_dir, args.controlled_prompts)
    rows = []
    for noise in args.noises:
        draft, target = controlled_pair(full, args.draft_layers, noise)
        for i, p in enumerate(prompts):
            rates = {k: generate(target, p, args.controlled_tokens, draft=draft, draft_tokens=k,
                                 stop=Stop()).stats["acceptance_rate"] for k in args.ks}
            row = {"part": "acceptance", "noise": noise, "prompt": i, **{f"K={k}": round(r, 3) for k, r in rates.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def part_useless(args, full, model_dir, tokenizer, tmp: Path) -> list[dict]:
    """A useless draft: the real SmolLM2 drafted for by its own first --draft-layers layers (they
    agree with it on a few % of tokens). `auto` must back off to plain decoding: never slower than
    target-only. Two cases: the draft object kept across generations (as `slm humaneval` and
    `slm demo` keep it: what auto learned carries over) and a fresh draft per generation (each
    generation pays for finding out: the draft's prefill and a few probes). transformers' own
    adaptive schedule ("heuristic": +2 after a full accept, -1 otherwise) is the peer."""
    from slm.speculative import ModelDraft, as_lm

    prompts = short_prompts(args, tokenizer, model_dir, max(3, args.controlled_prompts))
    n = args.useless_tokens
    draft, _ = controlled_pair(full, args.draft_layers, 0.0)
    hf_draft, hf_target = to_hf(draft, tmp, "draft"), to_hf(full, tmp, "target")
    kept = ModelDraft(as_lm(draft), full.config.vocab_size)
    engines = {"slm target": ours_plain(full, n), "slm auto kept": ours_spec(full, kept, n, "auto"),
               "slm auto fresh": ours_spec(full, draft, n, "auto"), "hf target": hf_run(hf_target, n),
               "hf heuristic": hf_run(hf_target, n, assistant_model=hf_draft, num_assistant_tokens_schedule="heuristic")}
    log(f"part 1, useless draft: {len(engines)} engines x {len(prompts)} prompts x {args.repeats} rounds")
    res = interleaved(engines, prompts, args.repeats)
    for spec in engines:
        eng = spec.split()[0]
        assert res[spec]["tokens"] == res[f"{eng} target"]["tokens"], f"{spec}: output differs from target-only greedy"
    row = {"part": "controlled", "target": "useless draft", "K": "auto"}
    for spec in ("slm auto kept", "slm auto fresh"):
        st = res[spec]["stats"]
        key = spec.split()[-1]
        row[f"{key}_acceptance"] = round(sum(s["draft_n_accepted"] for s in st) / max(sum(s["draft_n"] for s in st), 1), 3)
        row[f"{key}_drafted_per_generation"] = round(statistics.mean(s["draft_n"] for s in st), 1)
        speedups = ratios(res, "slm target", spec)
        row[f"slm_{key}_speedup"] = round(statistics.median(speedups), 3)
        row[f"slm_{key}_speedup_range"] = [round(min(speedups), 3), round(max(speedups), 3)]
    row["hf_heuristic_speedup"] = round(ratio(res, "hf target", "hf heuristic"), 3)
    print(json.dumps(row), flush=True)
    return [row]


def part_real(args, target, model_dir, tokenizer, tmp: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from slm.load import load_draft
    from slm.speculative import NgramDraft

    prompts = humaneval_prompts(tokenizer, args.prompts, model_dir, args.prompt_format)
    n, k = args.new_tokens, args.real_k
    hf_target = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    drafts = {spec: load_draft(spec, target=target, target_dir=model_dir) for spec in ("int8", "int4", "auto")}
    engines = {
        "slm target": ours_plain(target, n),
        "hf target": hf_run(hf_target, n),
        f"slm ngram K={k}": ours_spec(target, NgramDraft(), n, k),
        "slm ngram auto": ours_spec(target, NgramDraft(), n, "auto"),
        f"hf ngram K={k}": hf_run(hf_target, n, prompt_lookup_num_tokens=k),
        "slm int8 auto": ours_spec(target, drafts["int8"], n, "auto"),
        f"slm int4 K={k}": ours_spec(target, drafts["int4"], n, k),
        "slm int4 auto": ours_spec(target, drafts["int4"], n, "auto"),
        "slm auto auto": ours_spec(target, drafts["auto"], n, "auto"),  # lookup, else the int4 copy
        **distilled_engines(args, target, n, k),
    }
    if args.hf_int8:
        hf_q = torch.ao.quantization.quantize_dynamic(
            AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(), {torch.nn.Linear},
            dtype=torch.qint8,
        )
        engines[f"hf dyn-int8 K={k}"] = hf_assisted(hf_target, hf_q, n, k)
    log(f"part 2: {len(engines)} engines x {len(prompts)} prompts x {args.repeats} rounds, {n} new tokens")
    res = interleaved(engines, prompts, args.repeats)
    rows = []
    for name, r in res.items():
        eng = name.split()[0]
        ref = res[f"{eng} target"]
        assert r["tokens"] == ref["tokens"], f"{name}: output differs from {eng} target-only greedy"
        row = {"part": "real", "engine": name, "tokens_per_s": round(n * len(prompts) / r["seconds"], 2),
               "speedup": round(ratio(res, f"{eng} target", name), 3)}
        if r["stats"] and r["stats"][0]:
            st = r["stats"]
            drafted = sum(s["draft_n"] for s in st)
            row["acceptance"] = round(sum(s["draft_n_accepted"] for s in st) / max(drafted, 1), 3)
            row["mean_k"] = round(statistics.mean(s["mean_k"] for s in st), 2)
            if "distilled" in name:
                row.update(distilled_row_extras(res, name, len(prompts), n))
        hf_peer = {"ngram": f"hf ngram K={k}", "int8": f"hf dyn-int8 K={k}", "int4": f"hf dyn-int8 K={k}",
                   "auto": f"hf ngram K={k}"}.get(name.split()[1] if eng == "slm" else "")
        if hf_peer in res:
            row["hf_seconds_over_slm"] = round(ratio(res, hf_peer, name), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --- llama.cpp's speculative options beside slm's (--part real --llamacpp) ------------------------

LLAMACPP_NGRAM_MODES = ("ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


def llamacpp_engine(server, n):
    return lambda p: (server.complete(p, n)[0], {})


def part_real_llamacpp(args, target, model_dir, tokenizer, tmp: Path) -> list[dict]:
    """Part 2's prompts, slm's best drafts against llama.cpp's speculative options on the same
    weights (llama-server, greedy, one server per setting, all started first, then interleaved).
    Each engine's output must equal its own target-only output; llama.cpp's target-only output
    is also compared with slm's."""
    import contextlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _llamacpp

    from slm.gguf_export import export_gguf
    from slm.load import load_draft
    from slm.speculative import NgramDraft

    prompts = humaneval_prompts(tokenizer, args.prompts, model_dir, args.prompt_format)
    n, t = args.new_tokens, args.threads
    ggufs = {q: export_gguf(model_dir, tmp / f"target-{q}.gguf", dtype=q, progress=False) for q in ("f32", "q4_0", "q8_0")}
    settings = {"llama.cpp target": []}
    settings |= {f"llama.cpp {m}": ["--spec-type", m] for m in LLAMACPP_NGRAM_MODES}
    settings |= {f"llama.cpp draft {q}": ["-md", str(ggufs[q]), "-td", str(t), "--spec-type", "draft-simple"]
                 for q in ("q4_0", "q8_0")}
    drafts = {spec: load_draft(spec, target=target, target_dir=model_dir) for spec in ("int4", "auto")}
    engines = {
        "slm target": ours_plain(target, n),
        "slm ngram auto": ours_spec(target, NgramDraft(), n, "auto"),
        "slm int4 auto": ours_spec(target, drafts["int4"], n, "auto"),
        "slm auto auto": ours_spec(target, drafts["auto"], n, "auto"),
    }
    with contextlib.ExitStack() as stack:
        for name, extra in settings.items():
            try:
                server = stack.enter_context(_llamacpp.Server(ggufs["f32"], threads=t, extra=extra))
            except RuntimeError as e:  # a mode this llama.cpp build does not have
                log(f"  {name}: skipped ({e})")
                continue
            engines[name] = llamacpp_engine(server, n)
        log(f"part 2 vs llama.cpp: {len(engines)} engines x {len(prompts)} prompts x {args.repeats} rounds, {n} new tokens")
        res = interleaved(engines, prompts, args.repeats)
    rows = []
    for name, r in res.items():
        eng = "slm" if name.startswith("slm") else "llama.cpp"
        same = [a == b for a, b in zip(r["tokens"], res[f"{eng} target"]["tokens"])]
        if eng == "slm":  # slm's speculative output is its plain greedy output, token for token
            assert all(same), f"{name}: output differs from slm target-only greedy"
        row = {"part": "real-llamacpp", "engine": name, "tokens_per_s": round(n * len(prompts) / r["seconds"], 2),
               "speedup": round(ratio(res, f"{eng} target", name), 3),
               # llama.cpp's verify batches round differently from its single steps, so its speculative
               # greedy output can drift from its own plain output (seen with ngram-simple): counted, not asserted
               "prompts_same_as_own_target": sum(same)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    spec = lambda eng: [k for k in res if k.startswith(eng) and not k.endswith("target")]  # noqa: E731
    best_slm = min(spec("slm"), key=lambda k: res[k]["seconds"])
    best_llama = min(spec("llama.cpp"), key=lambda k: res[k]["seconds"])
    summary = {"part": "real-llamacpp", "slm_best": best_slm, "llamacpp_best": best_llama,
               "llamacpp_best_seconds_over_slm_best": round(ratio(res, best_llama, best_slm), 3),
               "llamacpp_target_over_slm_target": round(ratio(res, "llama.cpp target", "slm target"), 3),
               "same_target_tokens": res["llama.cpp target"]["tokens"] == res["slm target"]["tokens"],
               "threads": t, "loadavg": os.getloadavg()}
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    return rows


# --- distilled drafts (slm distill): rows of part 2 ----------------------------------------------


def distilled_engines(args, target, n: int, k: int) -> dict:
    """Part 2 rows for a distilled draft (--distilled DIR): alone at K and auto, and behind prompt
    lookup (auto:DIR, the way `auto` combines lookup with the int4 copy)."""
    if not args.distilled:
        return {}
    from slm.load import load_draft

    alone, hybrid = load_draft(args.distilled, target), load_draft(f"auto:{args.distilled}", target)
    feature_drafts = (alone, hybrid.model)

    def closing(run):
        def fn(p):
            try:
                return run(p)
            finally:  # the hooks come off, so the other engines' target forwards pay nothing for them
                for d in feature_drafts:
                    d.close()
        return fn

    return {
        f"slm distilled K={k}": closing(ours_spec(target, alone, n, k)),
        "slm distilled auto": closing(ours_spec(target, alone, n, "auto")),
        "slm auto:distilled auto": closing(ours_spec(target, hybrid, n, "auto")),
    }


def distilled_row_extras(res: dict, name: str, n_prompts: int, n: int) -> dict:
    """Acceptance per draft position (the i-th drafted token of a round, given the ones before it
    were accepted) and the draft's cost per token relative to one plain target decode step."""
    st = res[name]["stats"]
    drafting_rounds = sum(len(s["accepted_per_round"]) for s in st)
    width = max((len(s["accepted_per_pos"]) for s in st), default=0)
    per_pos = [sum(s["accepted_per_pos"][i] for s in st if len(s["accepted_per_pos"]) > i) for i in range(width)]
    by_position = []
    for i, kept in enumerate(per_pos):
        before = drafting_rounds if i == 0 else per_pos[i - 1]
        by_position.append(round(kept / before, 3) if before else None)
    drafted = sum(s["draft_n"] for s in st)
    draft_s = sum(s["draft_seconds"] for s in st)
    plain_step = res["slm target"]["seconds"] / (n_prompts * n)
    return {"acceptance_by_position": by_position,
            "draft_cost_vs_target_step": round(draft_s / max(drafted, 1) / plain_step, 3) if drafted else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["controlled", "pairs", "useless", "bound", "acceptance", "real", "real-llamacpp",
                                       "all"],
                    default="all",
                    help="controlled: the controlled pairs and the useless draft; pairs, useless: one of the two; "
                    "bound: the verify's cost and matmul rate against the core's peak (a minute); acceptance: the "
                    "noisy pair's acceptance for each --noises value (not part of all); real-llamacpp: only part 2's "
                    "comparison with llama.cpp (as --part real --llamacpp without the transformers rows)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded shared machine 2 threads ran 10x slower)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up (median)")
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5, 8], help="part 1: constant draft lengths")
    ap.add_argument("--draft-layers", type=int, default=8, help="part 1: layers of SmolLM2 kept in the draft")
    ap.add_argument("--noise", type=float, default=0.003, help="part 1: std of the appended wo/w2 in the noisy pair")
    ap.add_argument("--noises", type=float, nargs="+", default=[0.003, 0.0045, 0.005],
                    help="--part acceptance: the noise levels to try")
    ap.add_argument("--controlled-prompts", type=int, default=1)
    ap.add_argument("--controlled-tokens", type=int, default=253,
                    help="part 1: new tokens per prompt. The prediction is for steady state: every round drafts K "
                    "and the prefill is not counted. The default 253 is the prefill's token plus 252 = 4 x 63 = "
                    "6 x 42 = 9 x 28, so at acceptance 1 no round is cut short by the budget at K = 3, 5 or 8, and "
                    "the prefill weighs half what it does at 128")
    ap.add_argument("--useless-tokens", type=int, default=128, help="useless-draft part: new tokens per prompt")
    ap.add_argument("--controlled-prompt-tokens", type=int, default=24, help="part 1: last N tokens of each prompt")
    ap.add_argument("--prompts", type=int, default=2, help="part 2: first N HumanEval prompts (full run: 20)")
    ap.add_argument("--new-tokens", type=int, default=48, help="part 2: new tokens per prompt (full run: 128)")
    ap.add_argument("--real-k", type=int, default=4, help="part 2: the fixed draft length")
    ap.add_argument("--prompt-format", choices=["chat", "raw"], default="chat",
                    help="HumanEval prompts as slm's HumanEval evaluation builds them (default chat: the model writes code)")
    ap.add_argument("--distilled", default=None, metavar="DIR",
                    help="part 2: add rows for this distilled draft (slm distill), alone and behind prompt lookup")
    ap.add_argument("--hf-int8", action="store_true", help="part 2: add transformers with a dynamic-int8 assistant")
    ap.add_argument("--llamacpp", action="store_true",
                    help="part 2: also llama.cpp's speculative options on the same weights (needs setup_llamacpp.sh)")
    args = ap.parse_args()
    from slm.threads import set_threads

    set_threads(args.threads)  # pinned, as `--threads N` pins slm's native kernels
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from slm.tokenizer import Tokenizer

    full, model_dir = load_smollm2()
    tokenizer = Tokenizer.load(model_dir)
    log(f"threads {args.threads}, load average at start {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("bound", "all"):
            part_bound(args, full)
        if args.part == "acceptance":
            part_acceptance(args, full, model_dir, tokenizer)
        if args.part in ("controlled", "pairs", "all"):
            part_controlled(args, full, model_dir, tokenizer, Path(tmp))
        if args.part in ("controlled", "useless", "all"):
            part_useless(args, full, model_dir, tokenizer, Path(tmp))
        if args.part in ("real", "all"):
            part_real(args, full, model_dir, tokenizer, Path(tmp))
        if args.part == "real-llamacpp" or (args.llamacpp and args.part in ("real", "all")):
            part_real_llamacpp(args, full, model_dir, tokenizer, Path(tmp))
    print(json.dumps({"loadavg": os.getloadavg(), "threads": args.threads}))


if __name__ == "__main__":
    main()
