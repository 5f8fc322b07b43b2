#!/usr/bin/env bash
# Build the llama.cpp peer into .venv-llama/ (about 15-20 minutes on 2 cores the first time; a
# second run reuses what is there): llama-cpp-python compiled for this CPU, llama.cpp's own
# convert_hf_to_gguf.py (from the package's source distribution), and llama.cpp's command-line
# tools built from the same sources into .venv-llama/tools/: llama-quantize, llama-imatrix,
# llama-perplexity and llama-bench (LLAMA_TOOLS overrides the list). Used by `ternlm bench` and
# scripts/scoreboard.sh. Not part of the default install or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOOLS=${LLAMA_TOOLS:-"llama-quantize llama-imatrix llama-perplexity llama-bench"}
LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}
if ! .venv-llama/bin/python -c "import llama_cpp" 2>/dev/null; then
  "$PY" -m venv .venv-llama
  # the wheel scripts/test.sh builds for the GGUF agreement tests (TERNLM_WITH_PEER=1), else build it here
  if ls .cache/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl > /dev/null 2>&1; then
    .venv-llama/bin/pip install --quiet numpy .cache/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  else
    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llama/bin/pip install --quiet "llama-cpp-python==$LLAMA_VERSION" numpy
  fi
fi
if [ ! -d .venv-llama/llama.cpp ]; then
  version=$(.venv-llama/bin/python -c "import llama_cpp; print(llama_cpp.__version__)")
  .venv-llama/bin/pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d .venv-llama/sdist
  tar xzf .venv-llama/sdist/llama_cpp_python-"$version".tar.gz -C .venv-llama/sdist
  ln -sfn "$PWD/.venv-llama/sdist/llama_cpp_python-$version/vendor/llama.cpp" .venv-llama/llama.cpp
fi
missing=""
for t in $TOOLS; do [ -x ".venv-llama/tools/$t" ] || missing="$missing $t"; done
if [ -n "$missing" ]; then
  cmake -S .venv-llama/llama.cpp -B .venv-llama/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF > .venv-llama/cmake.log
  # shellcheck disable=SC2086
  cmake --build .venv-llama/build -j "$(nproc)" --target $missing >> .venv-llama/cmake.log
  mkdir -p .venv-llama/tools
  for t in $missing; do cp ".venv-llama/build/bin/$t" .venv-llama/tools/; done
fi
echo "llama.cpp peer ready: ternlm bench picks up .venv-llama/bin/python; tools in .venv-llama/tools/"
