"""Distillation curve for SmolLM2-135M: held-out perplexity against training tokens.

Distils the dequantized SmolLM2-135M teacher into a ternary ternlm checkpoint of it (absmean or
pt-bitnet PTQ) on WikiText-2 valid and scores WikiText-2 test (first 10 windows of 512 tokens, the
one perplexity). Prints the curve as a table and writes, under --run-dir:

    log.jsonl      every step (loss, tokens/s) and every eval point (eval_ppl)
    curve.png      perplexity against tokens
    summary.json   config, start / final / teacher perplexity, the curve, wall time

    python -m ternlm.cli quantize ../shared/data/smollm2-135m -o runs/smol-absmean \\
        --granularity per_group --group-size 64 --act-bits 16
    PYTHONPATH=. python scripts/distill_curve.py --student runs/smol-absmean

Re-running with --resume continues an interrupted run to the same end (from the last --save-every
checkpoint). On two shared CPU cores a step of 2 x 128 tokens takes 25-170 s and one perplexity
evaluation (10 x 512 tokens) several minutes; give it a GPU (--device cuda) for a long curve.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main(argv=None) -> int:
    from ternlm.errors import TernlmError
    from ternlm.fileio import save_json
    from ternlm.train.distill import LOG_FILE, PLOT_FILE, DistillConfig, distill

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(DATA / "smollm2-135m"))
    p.add_argument("--student", required=True, help="ternlm checkpoint of the teacher (absmean / pt-bitnet PTQ)")
    p.add_argument("--text", action="append", default=None, help="training text (default: WikiText-2 valid)")
    p.add_argument("--eval-text", default=str(DATA / "wikitext-2" / "wiki.test.raw"))
    p.add_argument("--out", default="runs/distill-smollm2/model")
    p.add_argument("--run-dir", default="runs/distill-smollm2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--continuous-steps", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)

    run = Path(a.run_dir)
    cfg = DistillConfig(teacher=a.teacher, student=a.student,
                        texts=tuple(a.text or [str(DATA / "wikitext-2" / "tokens.valid.txt")]), out=a.out,
                        eval_text=a.eval_text, steps=a.steps, batch_size=a.batch_size, block_size=a.block_size,
                        grad_accum=a.grad_accum, lr=a.lr, warmup_steps=a.warmup, continuous_steps=a.continuous_steps,
                        eval_every=a.eval_every, save_every=a.save_every, device=a.device,
                        state_dir=str(run / "state"), resume=a.resume)
    t0 = time.perf_counter()
    try:
        s = distill(cfg)
    except TernlmError as e:
        print(f"distill_curve: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    shutil.copyfile(run / "state" / LOG_FILE, run / LOG_FILE)
    if (run / "state" / PLOT_FILE).is_file():
        shutil.copyfile(run / "state" / PLOT_FILE, run / PLOT_FILE)
    save_json({**s, "wall_seconds": round(wall, 1)}, run / "summary.json")
    print(f"\nteacher perplexity {s['teacher_ppl']:.2f}; student start {s['start_ppl']:.2f}; "
          f"final (packed checkpoint) {s['final_ppl_packed']:.2f}")
    print(f"{'tokens':>10} {'perplexity':>11}")
    for tokens, ppl in s["curve"]:
        print(f"{tokens:>10,} {ppl:>11.2f}")
    print(f"{s['tokens']:,} tokens in {s['train_seconds']:.0f} s of training, {wall:.0f} s wall; wrote {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
