#!/usr/bin/env bash
# Set up ternlm (CPU build of torch first, so nothing pulls a CUDA build) and run the test suite.
# Real data sets are read from TERNLM_DATA_DIR (default: ../shared/data beside the repository).
# TERNLM_WITH_PEER=1 (set by CI) also installs the llama.cpp peer (llama-cpp-python, compiled from its
# source distribution once and cached as a wheel in .cache/wheels/), so the GGUF agreement tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet torch==2.13.0
extras="dev,eval,serve"
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then extras="dev,eval,serve,bnb,triton"; fi
"$PY" -m pip install --quiet -e ".[${extras}]"
if [ "${TERNLM_WITH_PEER:-0}" = "1" ]; then
  LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}
  mkdir -p .cache/wheels
  if ! ls .cache/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl > /dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION (a few minutes, once)"
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$PY" -m pip wheel --quiet --no-deps "llama-cpp-python==$LLAMA_VERSION" \
      -w .cache/wheels
  fi
  "$PY" -m pip install --quiet .cache/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl
fi
"$PY" -m pytest -q "$@"
