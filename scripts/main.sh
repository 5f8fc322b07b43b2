#!/usr/bin/env bash
# Set up ternlm and run the main job offline:
#   1. pre-train a small GPT-2-architecture LM on local text (no GPT-2 weights can be downloaded here),
#   2. `ternlm pipeline`: fp32 vs ternary PTQ vs ternary QAT vs int8 baselines on SMS spam,
#      perplexity on WikiText-2, report in runs/pipeline/.
# With hub access, skip step 1 and pass `--model gpt2 --data ucirvine/sms_spam --text wikitext`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${TERNLM_DATA_DIR:-../shared/data}
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -e .
if [ ! -f runs/gpt2-mini/model.safetensors ]; then
  ternlm pretrain --config "$DATA/gpt2-tokenizer" --text "$DATA/tinyshakespeare/input.txt" \
    --text "$DATA/wikitext-2/tokens.valid.txt" --out runs/gpt2-mini --steps 400
fi
ternlm pipeline --model runs/gpt2-mini --data "$DATA/sms_spam/SMSSpamCollection" \
  --text "$DATA/wikitext-2/wiki.test.raw" --lm-qat-text "$DATA/wikitext-2/tokens.valid.txt" --lm-qat-steps 150 \
  --epochs 2 --lr 2e-4 --qat-epochs 2 --qat-lr 5e-4 --qat-seeds 2 --out runs/pipeline "$@"
