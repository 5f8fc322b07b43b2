#!/usr/bin/env bash
# The quality scoreboard: SmolLM2-135M as ternlm's files and as llama.cpp's own low-bit files, every row
# scored by the same code (`ternlm eval`: WikiText-2 test perplexity on 10 x 512 tokens and the seven
# zero-shot tasks), then a table and a plot of quality against bits per weight.
#
#   bash scripts/scoreboard.sh [OUT]            # OUT defaults to runs/scoreboard
#
# LIMIT (default 500) documents per task. FULL (default empty; e.g. FULL="fp32 ptbitnet") names rows also
# scored on the full splits (about an hour a row on 2 cores). LLAMA_TYPES / LLAMA_IMATRIX_TYPES choose
# llama.cpp's files, PARETO="g128 g1536 b3.0" adds ternlm files at other bits per weight (group size,
# a budget of int8 linears) beside the default one-scale-per-row base-3 file.
# Resumable: a row whose JSON exists is not scored again (delete it to redo). Needs the llama.cpp peer
# (scripts/setup_llama_peer.sh, run first) and the zero-shot request files in $TERNLM_DATA_DIR/zeroshot.
# LLAMA=0 makes ternlm's rows only (no peer needed); llama.cpp rows already in OUT/eval stay in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${TERNLM_DATA_DIR:-../shared/data}
OUT=${1:-runs/scoreboard}
LIMIT=${LIMIT:-500}
FULL=${FULL:-}
LLAMA_TYPES=${LLAMA_TYPES:-"Q8_0 Q3_K_S Q2_K TQ2_0"}
LLAMA_IMATRIX_TYPES=${LLAMA_IMATRIX_TYPES:-"IQ2_M"}
PARETO=${PARETO-"g1536-base3"}  # PARETO="" for none
LLAMA=${LLAMA:-1}
DISTILL_STEPS=${DISTILL_STEPS:-100}
# the distillation: ternlm distill's default objective (logits KL) at lr 1e-3; scripts/distill_recipes.py
# compares objectives, learning rates and data on a held-out part of WikiText-2 valid. The zero-shot
# average on each task's first 100 documents is logged at every evaluation point (it chooses nothing).
DISTILL_FLAGS=${DISTILL_FLAGS:-"--batch-size 2 --block-size 128 --lr 1e-3 --warmup 20 --save-every 25 --eval-every 50
  --eval-tasks all --eval-tasks-limit 100 --tasks-dir $DATA/zeroshot"}
SMOL=$DATA/smollm2-135m
GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
CALIB=$DATA/wikitext-2/tokens.valid.txt   # calibration / distillation / imatrix text: never the test text
TEST=$DATA/wikitext-2/wiki.test.raw
mkdir -p "$OUT/eval" "$OUT/models"

[ "$LLAMA" = 0 ] || bash scripts/setup_llama_peer.sh
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
ptb() {  # ptb NAME [ternlm quantize flags...]: a pt-bitnet file calibrated on WikiText-2 valid
  local name=$1
  shift
  [ -d "$OUT/models/$name" ] || ternlm quantize "$SMOL" -o "$OUT/models/$name" --method pt-bitnet --calib "$CALIB" \
    --quiet "$@"
}

# the baseline and ternlm's default calibrated file first
score fp32 "$GGUF"
ptb ptbitnet --group-size 64
score ptbitnet "$OUT/models/ptbitnet"

# llama.cpp's files, by llama.cpp's quantizer from the f16 file of the dequantized baseline
if [ "$LLAMA" != 0 ]; then
  "$PY" scripts/llama_quants.py "$GGUF" "$OUT/llama" --types "${LLAMA_TYPES// /,}" \
    --imatrix-types "${LLAMA_IMATRIX_TYPES// /,}" --calib "$CALIB"
  seen=()
  rows=""
  for t in $LLAMA_IMATRIX_TYPES; do rows="$rows $t-imatrix"; done
  for t in $LLAMA_TYPES $rows; do
    f=$OUT/llama/$t.gguf
    twin=""
    for g in "${seen[@]}"; do cmp -s "$f" "$OUT/llama/$g.gguf" && twin=$g && break; done
    if [ -n "$twin" ]; then  # byte-identical files score the same: the row is copied, marked as such
      [ -f "$OUT/eval/llama-$t.json" ] || "$PY" - "$OUT/eval/llama-$twin.json" "$OUT/eval/llama-$t.json" "$f" "$twin" <<'PYEOF'
import json, sys
src, dst, path, twin = sys.argv[1:]
r = json.load(open(src))
r.update(model=path, identical_to=twin)
json.dump(r, open(dst, "w"), indent=2)
PYEOF
    else
      score "llama-$t" "$f"
    fi
    seen+=("$t")
  done
fi

# ternlm's other files and the in-memory baselines
[ -d "$OUT/models/absmean" ] || ternlm quantize "$SMOL" -o "$OUT/models/absmean" --quiet
score absmean "$OUT/models/absmean"
score int8_absmax "$GGUF" --quant int8_absmax
# other bits per weight: group size, the base-3 format, a budget of int8 linears (the Pareto curve)
for p in $PARETO; do
  case $p in
    g1536-base3) ptb ptbitnet-g1536-base3 --group-size 1536 --format base3 ;;
    g*) ptb "ptbitnet-$p" --group-size "${p#g}" ;;
    b*) ptb "ptbitnet-$p" --group-size 64 --budget-bpw "${p#b}" ;;
    *) echo "unknown PARETO entry $p (g<group size>, g1536-base3, b<bits per weight>)" >&2; exit 2 ;;
  esac
  score "ptbitnet-$p" "$OUT/models/ptbitnet-$p"
done

# the longest step last: distillation of the pt-bitnet file (resumable), then its row
if [ ! -d "$OUT/models/ptbitnet-distill" ]; then
  resume=""
  [ -f "$OUT/state/distill/ckpt/state.json" ] && resume="--resume"
  # shellcheck disable=SC2086
  ternlm distill --teacher "$SMOL" --student "$OUT/models/ptbitnet" --text "$CALIB" \
    -o "$OUT/models/ptbitnet-distill" --state-dir "$OUT/state/distill" --steps "$DISTILL_STEPS" \
    --eval-text "$TEST" $DISTILL_FLAGS $resume --quiet
fi
score ptbitnet-distill "$OUT/models/ptbitnet-distill"
score llm_int8 "$GGUF" --quant llm_int8
# the full splits last (about an hour a row on 2 cores)
score_full fp32 "$GGUF"
score_full ptbitnet "$OUT/models/ptbitnet"
score_full ptbitnet-distill "$OUT/models/ptbitnet-distill"
"$PY" scripts/scoreboard.py "$OUT" --plot docs/scoreboard.png --markdown "$OUT/scoreboard.md"
