"""`slm serve`."""

from __future__ import annotations

import argparse

from slm.cli import add_threads_argument, apply_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (needs slm[serve])",
        description="Serve MODEL (a model directory or .gguf) over HTTP: /v1/completions, /v1/chat/completions "
        "(with streaming), /v1/models, /health, /metrics (Prometheus), and a page at / that shows which tokens "
        "were drafted. Concurrent requests are decoded together (continuous batching); with --draft, a request "
        "that runs alone is decoded speculatively. Outputs are exactly the model's own either way.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory or .gguf file")
    p.add_argument("--draft", default=None, metavar="auto|int4|int8|ngram|DRAFT",
                   help="speculative decoding draft, as for `slm generate --draft`")
    p.add_argument("--draft-tokens", default="auto", metavar="K|auto", help="tokens drafted per round (default auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a row before new ones get 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="while requests are decoding, a joining prompt is computed at most N tokens per step "
                   "(chunked prefill: it bounds the running requests' inter-token latency, at the cost of the "
                   "joining request's time to first token; 0 = whole prompts; default: one native call's rows, 32)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="tokens per request, prompt + output (default min(model context, 4096)); "
                   "the KV cache holds max-batch x ctx positions")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="run the model with int8 weights, or int4 decoder layers with an int8 lm_head")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    add_threads_argument(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from slm.errors import SlmError

    apply_threads(args)
    try:
        from slm.serve.server import serve
    except ModuleNotFoundError as e:
        raise SlmError(f"slm serve needs the 'serve' extra ({e.name} is missing): pip install 'slm[serve]'") from None
    from slm.speculative import parse_draft_tokens

    serve(args.model, host=args.host, port=args.port, log_level=args.log_level, draft=args.draft,
          draft_tokens=parse_draft_tokens(args.draft_tokens), max_batch=args.max_batch, max_queue=args.max_queue,
          ctx=args.ctx, api_key=args.api_key, quantize=args.quantize,
          **({} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}))
    return 0
