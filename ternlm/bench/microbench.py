"""Packed ternary kernels vs torch fp32 ``F.linear`` on GPT-2 shapes.

    python -m ternlm.bench.microbench [--threads 2] [--batches 1 512] [--group-size 128]
                                        [--shapes 2304x768 3072x768] [--json out.json]

Times each op -- a kernel binding (``bind_linear``) made once, called repeatedly, as
``TernaryLinear`` and the decode runtime call it -- after warm-up at batch 1 (decode GEMV) and a
prefill batch, with per-tensor scales and with per-group scales (``--group-size``, ``pg`` columns),
prints a table with speed-ups over fp32, and writes the rows (best and median times) as JSON with
``--json``. The table uses the best time (``--stat min``, the default) because on a shared
machine a preempted thread inflates medians by whole scheduler slices; ``--stat median`` shows
those. Timings are for this machine only; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

# GPT-2 small (out, in): attn c_attn, attn c_proj, mlp c_fc, mlp c_proj, tied LM head.
GPT2_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768)]


def _time(fn, min_time: float = 0.3, max_reps: int = 200) -> tuple[float, float]:
    """(best, median) seconds per call."""
    from ternlm.timing import time_calls

    times = sorted(time_calls(fn, warmup=2, min_calls=5, min_time=min_time, max_calls=max_reps))
    return times[0], times[len(times) // 2]


def run(shapes=GPT2_SHAPES, batches=(1, 512), threads: int = 2, min_time: float = 0.3, stat: str = "min",
        group_size: int = 128) -> dict:
    from ternlm import kernels
    from ternlm.kernels import ops
    from ternlm.quant.pack import pack

    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        codes = torch.randint(-1, 2, (out_f, in_f), dtype=torch.int8)
        scale = torch.tensor(0.7)  # per tensor
        gscale = torch.rand(out_f, -(-in_f // group_size)) + 0.5  # per group
        packed = {fmt: pack(codes, fmt) for fmt in ("2bit", "base3")}
        bound = {
            "w2a8": ops.bind_linear(packed["2bit"], scale, in_f, "2bit", 8),
            "w2a16": ops.bind_linear(packed["2bit"], scale, in_f, "2bit", None),
            "wb3a8": ops.bind_linear(packed["base3"], scale, in_f, "base3", 8),
            "w2a8_pg": ops.bind_linear(packed["2bit"], gscale, in_f, "2bit", 8, group_size=group_size),
            "w2a16_pg": ops.bind_linear(packed["2bit"], gscale, in_f, "2bit", None, group_size=group_size),
            "wb3a8_pg": ops.bind_linear(packed["base3"], gscale, in_f, "base3", 8, group_size=group_size),
        }
        for m in batches:
            x = torch.randn(m, in_f)
            pick = 0 if stat == "min" else 1
            t = _time(lambda: F.linear(x, w), min_time)
            t_fp32 = t[pick]
            row = {"out": out_f, "in": in_f, "batch": m, "fp32_ms": t_fp32 * 1e3,
                   "fp32_best_ms": t[0] * 1e3, "fp32_median_ms": t[1] * 1e3}
            for name, f in bound.items():
                t = _time(lambda: f(x), min_time)
                row[f"{name}_ms"] = t[pick] * 1e3
                row[f"{name}_best_ms"], row[f"{name}_median_ms"] = t[0] * 1e3, t[1] * 1e3
                row[f"{name}_speedup"] = t_fp32 / t[pick]
            rows.append(row)
    return {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "ternlm.bench.microbench", *sys.argv[1:]]),
        "threads": threads,
        "stat": stat,
        "group_size": group_size,
        "kernel_level": kernels.get_level(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "bytes_per_weight": {"fp32": 4, "2bit": 0.25, "base3": 0.2},
        "rows": rows,
    }


_COLS = ("w2a8", "w2a8_pg", "w2a16", "w2a16_pg", "wb3a8", "wb3a8_pg")


def format_table(res: dict) -> str:
    head = f"{'out x in':>12} {'batch':>5} {'fp32 ms':>9} " + " ".join(f"{c + ' ms':>11} {'x fp32':>6}" for c in _COLS)
    lines = [f"# {res['command']}  (threads={res['threads']}, level={res['kernel_level']}, "
             f"{res['stat']} time, pg = per-group scales, group_size={res['group_size']}, torch {res['torch']})",
             head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(f"{r['out']:>6}x{r['in']:<5} {r['batch']:>5} {r['fp32_ms']:>9.3f} " +
                     " ".join(f"{r[c + '_ms']:>11.3f} {r[c + '_speedup']:>5.2f}x" for c in _COLS))
    return "\n".join(lines)


def _shape(s: str) -> tuple[int, int]:
    out_f, _, in_f = s.partition("x")
    return int(out_f), int(in_f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 512])
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per op")
    p.add_argument("--stat", choices=("min", "median"), default="min", help="time shown in the table")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale of the per-group columns")
    p.add_argument("--shapes", type=_shape, nargs="+", default=GPT2_SHAPES, help="OUTxIN, e.g. 2304x768")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    res = run(shapes=args.shapes, batches=tuple(args.batches), threads=args.threads, min_time=args.min_time,
              stat=args.stat, group_size=args.group_size)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
