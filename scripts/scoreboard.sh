#!/usr/bin/env bash
# The quality scoreboard: SmolLM2-135M as ternlm's files and as llama.cpp's own low-bit files, every row
# scored by the same code (`ternlm eval`: WikiText-2 test perplexity on 10 x 512 tokens and the seven
# zero-shot tasks), then a table and a plot of quality against bits per weight.
#
#   bash scripts/scoreboard.sh [OUT]            # OUT defaults to runs/scoreboard
#
# LIMIT (default 500) documents per task; FULL="fp32 ptbitnet-distill" rows also scored on the full splits.
# Resumable: a row whose JSON exists is not scored again (delete it to redo). Needs the llama.cpp peer
# (scripts/setup_llama_peer.sh, run first) and the zero-shot request files in $TERNLM_DATA_DIR/zeroshot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${TERNLM_DATA_DIR:-../shared/data}
OUT=${1:-runs/scoreboard}
LIMIT=${LIMIT:-500}
FULL=${FULL:-"fp32 ptbitnet-distill"}
DISTILL_STEPS=${DISTILL_STEPS:-900}
SMOL=$DATA/smollm2-135m
GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
CALIB=$DATA/wikitext-2/tokens.valid.txt   # calibration / distillation / imatrix text: never the test text
TEST=$DATA/wikitext-2/wiki.test.raw
mkdir -p "$OUT/eval" "$OUT/models"

bash scripts/setup_llama_peer.sh
# llama.cpp's files, by llama.cpp's quantizer from the f16 file of the dequantized baseline
"$PY" scripts/llama_quants.py "$GGUF" "$OUT/llama" --types Q8_0,IQ4_NL,Q3_K_S,Q2_K,TQ2_0,TQ1_0 \
  --imatrix-types IQ2_XS,IQ2_M --calib "$CALIB"

# ternlm's files
[ -d "$OUT/models/absmean" ] || ternlm quantize "$SMOL" -o "$OUT/models/absmean"
[ -d "$OUT/models/ptbitnet" ] || ternlm quantize "$SMOL" -o "$OUT/models/ptbitnet" --method pt-bitnet \
  --calib "$CALIB" --group-size 64
score() {  # score NAME MODEL [ternlm eval flags...]: one row, in its own process
  local name=$1 model=$2
  shift 2
  [ -f "$OUT/eval/$name.json" ] || ternlm eval "$model" "$@" --text "$TEST" --max-windows 10 --tasks all \
    --tasks-dir "$DATA/zeroshot" --limit "$LIMIT" --json "$OUT/eval/$name.json" --quiet
}
score_full() {  # score_full NAME MODEL [flags...]: the full splits, for the rows named in FULL
  local name=$1 model=$2
  shift 2
  case " $FULL " in *" $name "*)
    [ -f "$OUT/eval/$name.full.json" ] || ternlm eval "$model" "$@" --tasks all --tasks-dir "$DATA/zeroshot" \
      --json "$OUT/eval/$name.full.json" --quiet ;;
  esac
}
score fp32 "$GGUF"
score int8_absmax "$GGUF" --quant int8_absmax
score llm_int8 "$GGUF" --quant llm_int8
score absmean "$OUT/models/absmean"
score ptbitnet "$OUT/models/ptbitnet"
for f in "$OUT"/llama/*.gguf; do
  name=$(basename "$f" .gguf)
  case $name in f16|imatrix) continue ;; esac
  score "llama-$name" "$f"
done
# the longest step last: distillation of the pt-bitnet file (resumable), then its row
if [ ! -d "$OUT/models/ptbitnet-distill" ]; then
  resume=""
  [ -f "$OUT/state/distill/ckpt/state.json" ] && resume="--resume"
  ternlm distill --teacher "$SMOL" --student "$OUT/models/ptbitnet" --text "$CALIB" \
    -o "$OUT/models/ptbitnet-distill" --state-dir "$OUT/state/distill" --steps "$DISTILL_STEPS" \
    --batch-size 2 --block-size 128 --lr 1e-3 --warmup 20 --save-every 100 $resume --quiet
fi
score ptbitnet-distill "$OUT/models/ptbitnet-distill"
# the full splits last (about an hour a row on 2 cores)
score_full fp32 "$GGUF"
score_full ptbitnet-distill "$OUT/models/ptbitnet-distill"
"$PY" scripts/scoreboard.py "$OUT" --plot docs/scoreboard.png --markdown "$OUT/scoreboard.md"
