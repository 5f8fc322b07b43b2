#!/usr/bin/env bash
# Build the llama.cpp peer for `ternlm bench` into .venv-llama/ (15-20 minutes on 2 cores):
# llama-cpp-python compiled for this CPU, plus llama.cpp's own convert_hf_to_gguf.py (from the
# package's source distribution) for the peer's f16 file. Not part of the default install or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m venv .venv-llama
CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llama/bin/pip install --quiet llama-cpp-python numpy
.venv-llama/bin/pip download --quiet --no-deps --no-binary :all: llama-cpp-python -d .venv-llama/sdist
tar xzf .venv-llama/sdist/llama_cpp_python-*.tar.gz -C .venv-llama/sdist
ln -sfn "$(ls -d "$PWD"/.venv-llama/sdist/llama_cpp_python-*/vendor/llama.cpp)" .venv-llama/llama.cpp
echo "llama.cpp peer ready: ternlm bench picks up .venv-llama/bin/python"
