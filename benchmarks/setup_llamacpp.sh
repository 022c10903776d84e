#!/usr/bin/env bash
# Builds llama.cpp, the CPU peer of slm's speed benchmarks, once per machine into the slm cache.
#
# The sources come from PyPI: llama-cpp-python's sdist vendors llama.cpp (no other host is reachable).
# Native CPU flags (-DGGML_NATIVE=ON), static binaries, no curl. About 10-15 minutes on 2 cores; a
# second run finds the finished build and returns at once. Not part of CI.
#
#   bash benchmarks/setup_llamacpp.sh        # prints the bin directory on its last line
#
# The benchmarks find the binaries through slm's `benchmarks/_llamacpp.py` (same cache path), or
# $SLM_LLAMACPP_BIN to point at another build.
set -euo pipefail
SDIST_VERSION="${SLM_LLAMACPP_SDIST:-0.3.36}"
CACHE="${SLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slm}"
ROOT="$CACHE/llama.cpp-$SDIST_VERSION"
BIN="$ROOT/build/bin"
TARGETS=(llama-cli llama-bench llama-server llama-speculative llama-lookup llama-quantize llama-perplexity
         llama-simple)

if [ -f "$ROOT/.built" ]; then
  echo "setup_llamacpp: already built in $BIN"
  echo "$BIN"
  exit 0
fi

mkdir -p "$ROOT"
if [ ! -f "$ROOT/src/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  PY="${PYTHON:-python3}"
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$SDIST_VERSION"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$ROOT/src"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$ROOT/src"
fi

cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_OPENMP=ON > "$ROOT/cmake.log"
# Build only the targets this llama.cpp version has (names move between releases).
have="$(cmake --build "$ROOT/build" --target help)"
available=()
for t in "${TARGETS[@]}"; do
  if grep -qw -- "$t" <<<"$have"; then available+=("$t"); fi
done
cmake --build "$ROOT/build" -j "$(nproc)" --target "${available[@]}"
touch "$ROOT/.built"
echo "setup_llamacpp: built ${available[*]} in $BIN"
echo "$BIN"
