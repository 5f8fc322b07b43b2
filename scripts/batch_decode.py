"""Decode steps of the server's batch engine alone (no HTTP): tokens/s at 1, 2, 4, 8 and 16 slots.

    python scripts/batch_decode.py runs/smol-g64 [--ctx 512] [--steps 10]

Each slot is prefilled with the same 29 tokens, then ``--steps`` decode steps of all slots are timed
(after one untimed step), inside the engine's decode loop settings (DecodeEngine.decoding) as
``ternlm serve`` runs them.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a ternlm checkpoint directory")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--slots", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from ternlm.kernels import _ext
    from ternlm.runtime.engine import DecodeEngine, RuntimeConfig
    from ternlm.runtime.lean import read_checkpoint
    from ternlm.serve.batch import BatchEngine

    sizes = [int(s) for s in a.slots.split(",")]
    e = DecodeEngine.from_checkpoint(read_checkpoint(a.model), RuntimeConfig(head="auto", max_seq_len=a.ctx,
                                                                              step="python"))
    be = BatchEngine(e, max(sizes), a.ctx)
    print(f"kernel level {_ext.get_level()}, {a.threads} threads")
    with e.decoding():
        for S in sizes:
            for s in range(S):
                be.reset(s)
                be.prefill(s, list(range(1, 30)))
            slots = list(range(S))
            be.decode(slots, [5] * S)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                be.decode(slots, [5] * S)
            dt = (time.perf_counter() - t0) / a.steps
            print(f"{S:3d} slots: {dt * 1e3:6.1f} ms/step, {S / dt:6.0f} tok/s", flush=True)
    print(f"command: python scripts/batch_decode.py {a.model} --ctx {a.ctx} --steps {a.steps} --slots {a.slots}")


if __name__ == "__main__":
    main()
