#!/usr/bin/env bash
# Set up ternlm (CPU build of torch first, so nothing pulls a CUDA build) and run the test suite.
# Real data sets are read from TERNLM_DATA_DIR (default: ../shared/data beside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet torch==2.13.0
extras="dev,eval"
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then extras="dev,eval,bnb,triton"; fi
"$PY" -m pip install --quiet -e ".[${extras}]"
"$PY" -m pytest -q "$@"
