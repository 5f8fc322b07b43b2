"""Peak RSS of loading a ternlm checkpoint, each case in its own process, against the process baseline.

    python scripts/load_memory.py CKPT [CKPT ...] [--tokens 64] [--new-tokens 128]

For each checkpoint: the file size, and the peak RSS (``ru_maxrss`` of a child process) of
  - ``import torch, ternlm``                                  (the baseline every case includes)
  - ``ternlm.load(CKPT)`` + one forward pass of --tokens tokens (the Python API, HF model path)
  - ``ternlm generate`` of --new-tokens tokens                 (the decode engine read from the files)
and the increase over the baseline beside the target 1.5 x file + 100 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

LOAD = """
import sys, torch, ternlm
model, tok = ternlm.load(sys.argv[1])
ids = torch.randint(0, model.config.vocab_size, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(input_ids=ids)
"""


def peak_mib(cmd: list[str]) -> float:
    """Peak RSS of ``cmd`` (MiB): ru_maxrss of the child, read by wait4."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 1024


def file_mb(ck: Path) -> float:
    return sum(f.stat().st_size for f in ck.iterdir() if f.suffix == ".safetensors") / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    py = sys.executable
    base = peak_mib([py, "-c", "import torch, ternlm"])
    print(f"baseline (import torch, ternlm): {base:.1f} MiB")
    print("| checkpoint | file MB | load + forward MiB | over baseline | generate MiB | over baseline | target MiB |")
    print("|---|---|---|---|---|---|---|")
    for ck in map(Path, a.checkpoints):
        load = peak_mib([py, "-c", LOAD, str(ck), str(a.tokens)])
        gen = peak_mib([py, "-m", "ternlm.cli", "generate", "--model", str(ck), "--prompt", "The history of",
                        "--max-new-tokens", str(a.new_tokens)])
        mb = file_mb(ck)
        target = (1.5 * mb * 1e6 + 100e6) / 2**20
        print(f"| {ck} | {mb:.1f} | {load:.0f} | +{load - base:.0f} | {gen:.0f} | +{gen - base:.0f} | {target:.0f} |")


if __name__ == "__main__":
    main()
