#!/usr/bin/env bash
# Set up ternlm and run the main job offline, on a real pretrained LM: SmolLM2-135M-Instruct (Llama
# architecture, loaded dequantized from ../shared/data/smollm2-135m), fine-tuned as an SMS spam classifier
# and compared as fp32 vs ternary PTQ (absmean) vs calibrated ternary PTQ (pt-bitnet, at A16 and A8) vs
# ternary QAT (from the pt-bitnet classifier, its learning rate chosen on the validation split) vs int8
# baselines; the base LM's WikiText-2 perplexity and zero-shot accuracy (first 30 documents of seven tasks)
# under every quantizer, and a short distillation of the pt-bitnet LM. Duplicate messages are dropped before
# splitting. Report, plots and the distilled checkpoint in runs/pipeline/.
# Sized for <= 45 minutes on 2 CPU cores (subsampled training split, short runs); extra arguments are
# passed to `ternlm pipeline`.
# With hub access, the same on real GPT-2: `ternlm pipeline --model gpt2 --data ucirvine/sms_spam --text wikitext`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${TERNLM_DATA_DIR:-../shared/data}
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -e .
ternlm pipeline --model "$DATA/smollm2-135m" --data "$DATA/sms_spam/SMSSpamCollection" \
  --text "$DATA/wikitext-2/wiki.test.raw" --calib-text "$DATA/wikitext-2/tokens.valid.txt" \
  --limit-train 480 --limit-test 300 --max-length 64 --batch-size 16 \
  --epochs 1 --lr 1e-4 --qat-epochs 2 --qat-select ptbitnet@1e-4,ptbitnet@3e-4 --qat-seeds 1 \
  --granularity per_channel --limit-val 200 \
  --ppl-max-length 512 --ppl-stride 512 --ppl-windows 10 \
  --lm-qat-text "$DATA/wikitext-2/tokens.valid.txt" --lm-qat-steps 10 \
  --ptb-calib-tokens 2048 --ptb-seq-len 128 --ptb-group-size 64 --ptb-reconstruct-steps 8 \
  --distill-steps 16 --distill-batch-size 2 --distill-block-size 128 \
  --zeroshot-limit 30 --zeroshot-tasks-dir "$DATA/zeroshot" \
  --latency-messages 16 --robustness-limit 60 --gen-tokens 24 --out runs/pipeline "$@"
