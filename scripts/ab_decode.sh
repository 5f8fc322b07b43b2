#!/usr/bin/env bash
# Interleaved A/B decode timing of two builds of ternlm: each round runs the benchmark's ternlm worker
# (its own process, 16-token prompt, 128 greedy tokens, 2 threads, best of 3 generations) once from
# each tree, then prints every measurement and each tree's best and mean tok/s.
#
#   bash scripts/ab_decode.sh BASE_TREE NEW_TREE MODEL_DIR HEAD [ROUNDS]
#
# BASE_TREE / NEW_TREE: source trees with their extension built in place (e.g. a `git worktree add` of
# the earlier commit, then `python setup.py build_ext --inplace` in it); MODEL_DIR: a ternlm
# checkpoint; HEAD: int8 | fp16 | fp32 | bf16. The VM's speed drifts by tens of percent within minutes,
# so only interleaved rounds of the same run compare.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: ab_decode.sh BASE_TREE NEW_TREE MODEL_DIR HEAD [ROUNDS]" >&2; exit 2; }
BASE=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); MODEL=$(cd "$3" && pwd); HEAD=$4; ROUNDS=${5:-5}
SPEC="{\"threads\": 2, \"prompt_tokens\": 16, \"new_tokens\": 128, \"repeats\": 3, \"vocab_size\": 1000, \"seed\": 0, \"model_dir\": \"$MODEL\", \"gelu\": \"tanh\", \"head\": \"$HEAD\"}"
for r in $(seq "$ROUNDS"); do
  for tree in "$BASE" "$NEW"; do
    tok=$(cd /tmp && OMP_NUM_THREADS=2 PYTHONPATH="$tree" python -W ignore -m ternlm.bench.workers ternlm "$SPEC" |
          python -c "import json, sys; print(round(json.loads(sys.stdin.read())['decode_tok_s'], 1))")
    echo "$r $tree $tok"
  done
done | awk '{print} {b[$2] = ($3 > b[$2] ? $3 : b[$2]); s[$2] += $3; n[$2]++}
            END {for (k in b) printf "%s best %.1f mean %.1f tok/s\n", k, b[k], s[k] / n[k]}'
