#!/usr/bin/env bash
# CPU-scale sweep of training from scratch: fp, W1.58A16, W1.58A8, W1.58A4, W1.58A16 + 4 knowledge tokens,
# W1.58A16 + 1 (a learned attention sink).
# Same model (gpt2-mini: GPT-2 architecture, 4 layers x 256 wide, GPT-2 BPE), same data order, same
# tokens per run (STEPS x BATCH x SEQ). Then one comparison table + loss plot, and the W1.58A8 model
# converted to packed 2-bit and generating text.
#   usage: scripts/scratch_sweep.sh [OUT_DIR]     (env: STEPS, BATCH, SEQ, DATA_DIR)
set -euo pipefail
OUT=${1:-runs/scratch-sweep}
STEPS=${STEPS:-1002}
BATCH=${BATCH:-16}
SEQ=${SEQ:-128}
DATA_DIR=${DATA_DIR:-${TERNLM_DATA_DIR:-../shared/data}}
T="python -m ternlm.cli"
mkdir -p "$OUT"
TEXTS=("$DATA_DIR/tinyshakespeare/input.txt" "$DATA_DIR/wikitext-2/wiki.test.raw" "$DATA_DIR/wikitext-2/tokens.valid.txt")
# A 4,096-entry byte-level BPE trained on the two texts: with GPT-2's 50,257 entries the tied
# embedding/head would be 80% of a 4 x 256 model's compute, and this sweep runs on 2 shared cores.
[ -f "$OUT/tokenizer/tokenizer.json" ] || python - "$OUT/tokenizer" "${TEXTS[@]}" <<'PY'
import sys
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast
bpe = ByteLevelBPETokenizer()
bpe.train(sys.argv[2:], vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
tok.save_pretrained(sys.argv[1])
PY
[ -f "$OUT/data/meta.json" ] || $T prepare-data "${TEXTS[@]}" -o "$OUT/data" --tokenizer "$OUT/tokenizer" \
    --val-fraction 0.1 --quiet
common=(--data "$OUT/data" --model-config gpt2-mini --seq-len "$SEQ" --batch-size "$BATCH" --micro-batch "$BATCH"
        --steps "$STEPS" --eval-every $((STEPS / 6)) --eval-tokens 8192 --save-every $((STEPS / 3)) --quiet)
run() {  # name, extra args...; resumes a killed run, skips a finished one
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  local resume=(); [ -f "$OUT/$name/train_config.json" ] && resume=(--resume)
  $T train "${common[@]}" -o "$OUT/$name" "$@" "${resume[@]}"
}
run fp --variant fp
run w158a16 --variant w158a16
run w158a8 --variant w158a8
run w158a4 --variant w158a4
run w158a16-k4 --variant w158a16 --knowledge-tokens 4
run w158a16-k1 --variant w158a16 --knowledge-tokens 1   # a learned attention sink: the baseline for K = 4
$T compare "$OUT"/fp "$OUT"/w158a16 "$OUT"/w158a8 "$OUT"/w158a4 "$OUT"/w158a16-k4 "$OUT"/w158a16-k1 -o "$OUT/compare"
# One trained ternary model, packed and generating.
python - "$OUT" <<'PY'
import sys
from pathlib import Path
import ternlm
from ternlm.conversion import convert
from ternlm.nn.knowledge import save_model_with_knowledge
out = Path(sys.argv[1])
from ternlm.config import TernaryConfig
from ternlm.nn.knowledge import load_knowledge
src = out / "w158a8" / "model"
model, tok = ternlm.load(src)
load_knowledge(model, src)
# The latent weights of the BitLinears are in the HF directory; the canonical quantizer packs them.
convert(model, TernaryConfig(act_bits=8), fmt="2bit")
save_model_with_knowledge(model, tok, out / "w158a8-packed", packed=True)
PY
$T generate --model "$OUT/w158a8-packed" --prompt "ROMEO:" --max-new-tokens 40 --engine hf | tee "$OUT/generate.txt"
