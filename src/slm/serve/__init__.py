"""`slm serve`: an OpenAI-compatible HTTP server (optional extra `slm[serve]`).

- `protocol`: request checking, response and stream-chunk shapes, error objects.
- `app`: FastAPI routes, SSE, API key, /metrics, the page at / (`static/index.html`).
- `scheduler`: continuous batching over one static KV cache, one row per request.
- `decoding`: every call into slm's decoding library (single-request path, prefill, batched step).
- `requests`: one request's tokens, text, stop strings and timings; `metrics`: Prometheus counters.
- `server`: loading the model and draft, running uvicorn.
"""
