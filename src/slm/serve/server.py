"""`slm serve`: load the model (and draft), start the scheduler thread, run uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from slm.chat import load_chat_template, render_chat
from slm.errors import SlmError
from slm.generate import stop_ids_for
from slm.load import load_draft, load_model, resolve_model_dir
from slm.quantize import QUANTIZERS
from slm.serve.app import ServerState, create_app
from slm.serve.decoding import Decoder
from slm.serve.metrics import Metrics
from slm.serve.scheduler import PREFILL_CHUNK, Scheduler
from slm.tokenizer import Tokenizer


def build_state(model_path: str | os.PathLike, *, draft: str | None = None, draft_tokens: int | str = "auto",
                max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK, ctx: int | None = None,
                api_key: str | None = None, quantize: str | None = None) -> ServerState:
    if max_batch < 1:
        raise SlmError(f"--max-batch must be >= 1, got {max_batch}")
    if max_queue < 0:
        raise SlmError(f"--max-queue must be >= 0, got {max_queue}")
    if prefill_chunk < 0:
        raise SlmError(f"--prefill-chunk must be >= 0 (0: whole prompts), got {prefill_chunk}")
    model_dir = resolve_model_dir(model_path)
    model = load_model(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    full = model.config.max_seq_len
    if ctx is not None and not 2 <= ctx <= full:
        raise SlmError(f"--ctx must be in [2, {full}] (the model's context), got {ctx}")
    ctx = ctx or min(full, 4096)
    loaded_draft = None
    if draft is not None:
        loaded_draft = load_draft(draft, target=model, target_dir=model_dir)  # before quantizing the target
    if quantize:
        QUANTIZERS[quantize](model)
    metrics = Metrics()
    decoder = Decoder(model, max_batch, ctx, loaded_draft, draft_tokens)
    scheduler = Scheduler(decoder, max_batch, max_queue, metrics, prefill_chunk)
    render = None
    template = load_chat_template(model_dir)
    if template is not None:
        render = lambda messages: render_chat(template, messages, where=str(model_dir))  # noqa: E731
    stop_ids = frozenset(stop_ids_for(model, tokenizer))
    return ServerState(name=Path(model_path).name, tokenizer=tokenizer, vocab_size=model.config.vocab_size, ctx=ctx,
                       stop_ids=stop_ids, scheduler=scheduler, metrics=metrics, render_chat=render, api_key=api_key,
                       draft=draft)


def serve(model_path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **kwargs) -> None:
    import uvicorn

    state = build_state(model_path, **kwargs)
    state.scheduler.start()
    try:
        print(f"slm serve: {state.name} on http://{host}:{port} (context {state.ctx}, draft {state.draft})",
              flush=True)
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)
    finally:
        state.scheduler.stop()
