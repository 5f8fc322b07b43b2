#!/usr/bin/env bash
# The serving load test (scripts/load_test.py): ternlm serve vs llama.cpp's llama-server vs llama-cpp-python's
# server on SmolLM2-135M, same machine and threads, one at a time. Sets up what it needs first: the llama.cpp
# peer with llama-server (scripts/setup_llama_peer.sh), llama-cpp-python's server extras, locust in
# .venv-load/, and the ternary checkpoint (groups of 64, int8 head rows). Extra arguments go to load_test.py.
#
#   bash scripts/load_test.sh                   # 1, 4, 16, 64 clients, 60 s each
#   bash scripts/load_test.sh --soak 600        # ternlm serve alone, 16 clients for 10 minutes
# llama-server runs with --no-repack: its AMX weight repacking crashes (SIGSEGV) on this Sapphire Rapids VM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${TERNLM_DATA_DIR:-../shared/data}
GGUF=$DATA/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_TOOLS="llama-quantize llama-imatrix llama-perplexity llama-bench llama-server" bash scripts/setup_llama_peer.sh
.venv-llama/bin/pip install --quiet "llama-cpp-python[server]==$(.venv-llama/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
[ -x .venv-load/bin/locust ] || { "$PY" -m venv .venv-load && .venv-load/bin/pip install --quiet locust; }
"$PY" -m pip install --quiet -e ".[serve]"
[ -d runs/smol-g64 ] || ternlm quantize "$DATA/smollm2-135m" -o runs/smol-g64 --granularity per_group --group-size 64
"$PY" scripts/load_test.py --ternlm runs/smol-g64 --gguf "$GGUF" "$@"
