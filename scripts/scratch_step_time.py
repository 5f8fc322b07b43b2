"""Training step time of each from-scratch variant, measured alone: each run in its own process, in
interleaved rounds, the median step of each kept (the first steps, which warm up, are dropped).

    PYTHONPATH=. python scripts/scratch_step_time.py --data runs/scratch-2m/data [--steps 24 --rounds 3]

The sweep's own ``s/step`` column is the mean over a long run and moves with whatever else shares
the machine; this is the like-for-like comparison (same model, batch, data, thread count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("fp", "w158a16", "w158a8", "w158a4")


def one(data: str, variant: str, steps: int, batch: int, seq: int, config: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "ternlm.cli", "train", "--data", data, "--model-config", config,
               "--variant", variant, "-o", str(Path(d) / "run"), "--steps", str(steps), "--batch-size", str(batch),
               "--micro-batch", str(batch), "--seq-len", str(seq), "--eval-every", str(10 * steps),
               "--save-every", str(10 * steps), "--log-every", "1", "--eval-tokens", "1024", "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if r.returncode:
            raise SystemExit(f"{variant} failed:\n{r.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(d) / "run" / "log.jsonl").read_text().splitlines()]
        dts = [r["dt"] for r in rows if "dt" in r and r.get("step", 0) > 4]
        return statistics.median(dts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model-config", default="gpt2-mini")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    best = {v: float("inf") for v in VARIANTS}
    for r in range(a.rounds):
        for v in VARIANTS:
            best[v] = min(best[v], one(a.data, v, a.steps, a.batch, a.seq, a.model_config))
            print(f"round {r + 1}: {v:<8} median step {best[v] * 1e3:.0f} ms (best so far)", flush=True)
    print(f"\n{'variant':<9} {'s/step':>8} {'vs fp':>6}")
    for v in VARIANTS:
        print(f"{v:<9} {best[v]:8.3f} {best[v] / best['fp']:6.2f}")
    print(f"\ncommand: PYTHONPATH=. python scripts/scratch_step_time.py --data {a.data} --steps {a.steps} "
          f"--rounds {a.rounds} --batch {a.batch} --seq {a.seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
