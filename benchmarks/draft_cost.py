"""What a draft costs next to the target it serves, one process, interleaved (A, B, A, B, ... medians).

    python benchmarks/draft_cost.py --distilled DIR          # SmolLM2-135M-Instruct as the target
    python benchmarks/draft_cost.py --distilled DIR --repeats 5 --calls 3   # a quick check that it runs

Part 1, the target's step with a feature draft's tap attached (`FeatureTap`): a decode step (1 row) and
a verification call (K+1 rows) at a real context, three ways: no tap (the plain native step), the tap
on the native kernels (what decoding runs now), and the tap on the eager PyTorch forward (what any
other forward hook still gets, and what a tap got before the kernels returned the tapped layers).
Part 2, each draft's cost per drafted token relative to one plain target decode step: prompt lookup,
the int4 self-draft, and the distilled draft of --distilled (its head's parts timed on their own too:
the layer step, the trimmed-vocabulary output layer). Every figure is the median over rounds; ratios
are medians of each round's own ratio (the parts of a round ran back to back, so load that changes
between rounds cancels). The load average is printed: on a busy machine the absolute times mean
little, the ratios somewhat more.
Part 2b (with --distilled, when DIR keeps its samples and features): the held-out acceptance per draft
position of the head in fp32 and as decoding runs it (`int8_head`), on distillation's own held-out split.
Part 3 (--prompts P > 0, with --distilled): greedy generation of --new-tokens on the first P HumanEval
prompts, target alone vs the distilled draft at K (tap native) vs the same with its tap sent to the
eager forward (before), interleaved rounds (`speculative.interleaved`), outputs checked identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculative import (distilled_row_extras, humaneval_prompts, interleaved, load_smollm2, log,  # noqa: E402
                         ours_plain, ours_spec, ratios)


def per_call(fn, calls: int) -> float:
    """Median seconds of `calls` calls of fn()."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rounds(parts: dict, repeats: int, calls: int) -> dict[str, list[float]]:
    """parts: name -> (setup, fn). Each round runs every part (setup, then `calls` timed calls of fn),
    in reverse order on odd rounds, after one warm-up round. -> name -> per-round median seconds."""
    out = {name: [] for name in parts}
    for r in range(repeats + 1):
        order = list(parts.items()) if r % 2 == 0 else list(parts.items())[::-1]
        for name, (setup, fn) in order:
            setup()
            t = per_call(fn, calls)
            if r:
                out[name].append(t)
    return out


def summary(times: dict[str, list[float]], base: str) -> dict:
    return {name: {"ms": round(1e3 * statistics.median(ts), 3),
                   "vs_" + base.replace(" ", "_"): round(statistics.median(a / b for a, b in zip(ts, times[base])), 3)}
            for name, ts in times.items()}


def held_out_acceptance(path: str, target, model_dir) -> dict:
    """Part 2b: greedy acceptance of the 1st..4th drafted token on the distillation's held-out samples."""
    import torch

    from slm.distill.cache import FeatureCache
    from slm.distill.objective import acceptance_by_depth
    from slm.distill.run import DistillConfig, held_out_batches, pick, split
    from slm.distill.samples import Samples
    from slm.speculative.features import input_embedding, int8_head
    from slm.speculative.head import load_head
    from slm.tokenizer import Tokenizer

    cfg = DistillConfig()
    samples = Samples.load(Path(path) / "samples.safetensors")
    cache = FeatureCache.load(Path(path) / "features.safetensors")
    _, test = split(samples, cfg.held_out)
    eos = Tokenizer.load(model_dir).eos_id
    batches = held_out_batches(pick(samples, test), cache.select(test), cfg.train.seq_len, eos if eos is not None else 0)
    head = load_head(path, input_embedding(target))
    with torch.inference_mode():
        return {name: [round(a, 4) for a in acceptance_by_depth(h, batches, 4)]
                for name, h in (("fp32 head", head), ("int8 head (decoding)", int8_head(head)))}


def generation(args, target, model_dir, feature) -> dict:
    """Part 3: speedup over the target alone, the tap native and eager; acceptance per drafted token."""
    from slm.tokenizer import Tokenizer

    prompts = humaneval_prompts(Tokenizer.load(model_dir), args.prompts, model_dir)
    plain, spec = ours_plain(target, args.new_tokens), ours_spec(target, feature, args.new_tokens, args.k)

    def tapped(eager: bool):
        def run(p):
            hook = target.layers[0].register_forward_hook(lambda *a: None) if eager else None
            try:
                return spec(p)
            finally:
                if hook is not None:
                    hook.remove()
                feature.close()  # the target-only rounds pay nothing for the tap
        return run

    res = interleaved({"slm target": plain, "tap native": tapped(False), "tap eager (before)": tapped(True)}, prompts,
                      args.repeats)
    for name in ("tap native", "tap eager (before)"):
        if res[name]["tokens"] != res["slm target"]["tokens"]:
            raise SystemExit(f"{name}: output differs from the target's")
    st = res["tap native"]["stats"]  # per prompt
    out = {name: {"seconds": round(res[name]["seconds"], 2),
                  "speedup": round(statistics.median(ratios(res, "slm target", name)), 3)} for name in res}
    out["acceptance_rate"] = round(sum(s["draft_n_accepted"] for s in st) / max(sum(s["draft_n"] for s in st), 1), 3)
    out |= distilled_row_extras(res, "tap native", len(prompts), args.new_tokens)
    log(f"generate: {json.dumps(out)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distilled", help="a distilled draft directory (`slm distill`) for the target")
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per round (the verify call has K+1 rows)")
    ap.add_argument("--repeats", type=int, default=15, help="rounds")
    ap.add_argument("--calls", type=int, default=5, help="timed calls per part per round")
    ap.add_argument("--threads", type=int, default=1, help="torch and native threads (pinned)")
    ap.add_argument("--prompts", type=int, default=0, help="part 3: HumanEval prompts to generate for (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=64, help="part 3: tokens per prompt")
    args = ap.parse_args()

    import torch

    from slm.load import load_draft
    from slm.sampling import SamplingParams
    from slm.speculative import SlmLM
    from slm.speculative.schedule import Plan
    from slm.threads import set_threads
    from slm.tokenizer import Tokenizer

    set_threads(args.threads)
    log(f"threads {args.threads}, load average at start {os.getloadavg()}")
    target, model_dir = load_smollm2()
    context = humaneval_prompts(Tokenizer.load(model_dir), 1, model_dir)[0]
    context = context + context[-40:]  # a repeat at the end: prompt lookup has something to offer
    n, k = len(context), args.k
    lm = SlmLM(target)
    feature = load_draft(args.distilled, target) if args.distilled else None
    length = n + 2 * k + 8

    def fill():
        """Fresh caches over the context (the target's, and the tap's buffer when attached)."""
        if feature is not None and feature.tap.handles:
            feature.reset(length)
        lm.prepare(length)
        lm.forward(context, 0, last_only=True)

    result: dict = {"context_tokens": n, "k": k, "threads": args.threads}
    with torch.inference_mode():
        # --- part 1: the target's step with a tap --------------------------------------------------
        fill()
        step = lambda: lm.forward(context[-1:], n - 1)  # noqa: E731  (rewrites the same position each call)
        verify = lambda: lm.forward(context[-(k + 1):], n - k - 1)  # noqa: E731
        if feature is not None:
            eager_hook = []

            def variant(tap: bool, eager: bool):
                def setup():
                    feature.close()
                    for h in eager_hook:
                        h.remove()
                    eager_hook.clear()
                    if tap:
                        feature.tap.attach()
                        feature.reset(length)
                    if eager:  # any hook that is not a tap's sends the forward to PyTorch
                        eager_hook.append(target.layers[0].register_forward_hook(lambda *a: None))
                return setup

            for what, fn in (("step", step), (f"verify K+1={k + 1}", verify)):
                times = rounds({"no tap": (variant(False, False), fn), "tap native": (variant(True, False), fn),
                                "tap eager (before)": (variant(True, True), fn)}, args.repeats, args.calls)
                result[f"target {what}"] = summary(times, "no tap")
                log(f"target {what}: {json.dumps(result[f'target {what}'])}")
            variant(False, False)()

        # --- part 2: each draft's cost per drafted token ---------------------------------------------
        drafts = {"ngram": load_draft("ngram", target), "int4": load_draft("int4", target)}
        if feature is not None:
            drafts["distilled"] = feature
        plans: dict = {}

        def untapped():
            if feature is not None:
                feature.close()

        parts = {"target step": (untapped, step)}
        for name, draft in drafts.items():
            def setup(draft=draft):
                untapped()
                if draft is feature:
                    draft.tap.attach()
                draft.reset(length)
                fill()
                offers = draft.offers(context)
                plans[draft] = Plan(offers[0], k) if offers else None
                if plans[draft] is not None:
                    draft.propose(context, plans[draft], SamplingParams())  # a first round's catch-up, untimed

            def propose(draft=draft):
                if plans[draft] is not None:
                    draft.propose(context, plans[draft], SamplingParams())
            parts[f"{name} per token"] = (setup, propose)
        if feature is not None:
            head = feature.head
            h = torch.zeros(1, head.config.dim)
            parts["distilled: head layer step"] = (lambda: None, lambda: head.step([context[-1]], n - 1, h))
            parts["distilled: trimmed output layer"] = (lambda: None, lambda: head.logits(h[0]))
        times = rounds(parts, args.repeats, args.calls)
        for name in drafts:
            times[f"{name} per token"] = [t / k for t in times[f"{name} per token"]]
        result["draft cost"] = summary(times, "target step")
        log(f"draft cost: {json.dumps(result['draft cost'])}")
        if feature is not None:
            feature.close()
    if feature is not None and (Path(args.distilled) / "features.safetensors").is_file():
        result["held-out acceptance"] = held_out_acceptance(args.distilled, target, model_dir)
        log(f"held-out acceptance: {json.dumps(result['held-out acceptance'])}")
    if feature is not None and args.prompts > 0:
        result["generate"] = generation(args, target, model_dir, feature)
    result["loadavg"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
