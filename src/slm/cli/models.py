"""`slm import` and `slm generate`."""

from __future__ import annotations

import argparse
import json
import sys

from slm.cli import add_threads_argument, apply_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert a llama-architecture GGUF file to a model directory",
        description="Convert a llama-architecture GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
        "Q2_K..Q6_K) to a Hugging Face model directory (config.json, model.safetensors, tokenizer.json), "
        "dequantised to fp32, with llama.cpp's rotary permutation of the q/k weights undone.",
    )
    p.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="model directory to write: new, empty or one slm wrote (replaced atomically)")
    p.set_defaults(func=_import)

    p = sub.add_parser(
        "generate",
        help="generate a completion (optionally with speculative decoding)",
        description="Generate a completion of --prompt with MODEL (a model directory, a .gguf file, or a "
        "transformers model directory of an architecture slm does not run itself). "
        "Prints only the completion, streamed as it is produced on a terminal. Greedy unless --temperature > 0.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory, .gguf file or transformers model directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument(
        "--draft", metavar="DRAFT", default=None,
        help="speculative decoding: a draft model directory/.gguf, 'ngram' (prompt lookup), 'int8' or 'int4' "
        "(the target's own quantized copy: int8, or int4 layers with an int8 lm_head) or 'auto' (prompt lookup, "
        "else the int4 copy), a distilled draft directory (slm distill) or 'auto:DIR' (prompt lookup, else that draft); the output is the target's own (greedy) or distributed as it (sampling)",
    )
    p.add_argument(
        "--draft-tokens", default="auto", metavar="K|auto",
        help="tokens the draft proposes per round: an integer, or 'auto' to adapt from acceptance (default)",
    )
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="run the model with int8 weights, or int4 decoder layers and an int8 lm_head (faster "
                   "on CPU; perplexity cost: benchmarks/perplexity.py)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, timing) instead of text")
    add_threads_argument(p)
    p.set_defaults(func=_generate)


def _import(args: argparse.Namespace) -> int:
    from slm.gguf_import import import_gguf

    out = import_gguf(args.gguf, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


class _TextStream:
    """Prints decoded text as tokens arrive; waits while the text ends in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def __call__(self, token: int, from_draft: bool = False) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


def _generate(args: argparse.Namespace) -> int:
    apply_threads(args)

    from slm.chat import apply_chat_template
    from slm.generate import Stop, generate, stop_ids_for
    from slm.errors import SlmError
    from slm.load import load_any, load_draft
    from slm.model import Transformer
    from slm.quantize import QUANTIZERS
    from slm.sampling import SamplingParams, make_generator
    from slm.speculative import parse_draft_tokens
    from slm.tokenizer import Tokenizer

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    generator = make_generator(args.seed)
    draft_tokens = parse_draft_tokens(args.draft_tokens)
    model, model_dir = load_any(args.model)
    if args.quantize and not isinstance(model, Transformer):
        raise SlmError(f"{args.model}: --quantize needs a model slm runs itself, not a transformers model")
    tokenizer = Tokenizer.load(model_dir)
    prompt_text = args.prompt
    if args.chat:
        prompt_text = apply_chat_template(model_dir, [{"role": "user", "content": args.prompt}])
    prompt = tokenizer.encode(prompt_text)
    # The draft first: an int4/int8 self-draft is made from the fp32 weights, before --quantize.
    draft = load_draft(args.draft, target=model, target_dir=model_dir) if args.draft is not None else None
    if args.quantize:
        QUANTIZERS[args.quantize](model)
    stream = _TextStream(tokenizer) if (sys.stdout.isatty() and not args.json) else None
    result = generate(
        model, prompt, args.max_new_tokens, sampling, draft=draft, draft_tokens=draft_tokens,
        stop=Stop(stop_ids_for(model, tokenizer)), on_token=stream, generator=generator,
    )

    text = tokenizer.decode(result.tokens)
    if args.json:
        out = {
            "text": text,
            "tokens": result.tokens,
            "new_tokens": result.new_tokens,
            "prompt_tokens": result.prompt_tokens,
            "seconds": round(result.seconds, 4),
            "prefill_seconds": round(result.prefill_seconds, 4),
            "tokens_per_second": round(result.tokens_per_second, 3),
            "stop_reason": result.stop_reason,
            **result.stats,
        }
        print(json.dumps(out))
    elif stream is not None:
        stream.out.write(text[stream.printed :] + "\n")
    else:
        print(text)
    return 0
