"""GPU benchmark of the Triton 2-bit kernels against cuBLAS bf16: ``python -m ternlm.bench.gpu_bench``.

Four parts, each printed as a table (and all rows written to ``--json``):

1. ``check``: the kernels on the GPU against the CPU reference, fresh random inputs (W2A8 bit for
   bit, one token and several; W2A16 within float32 rounding; per tensor, per row, per group).
2. ``sweep_gemv``: the one-token kernel's (rows per program, blocks per step, warps) at one shape.
3. ``bench_gemv``: one linear, W2A8 / W2A16 against ``F.linear`` on bf16 weights (cuBLAS), at
   several shapes and token counts. Two timings each: ``triton.testing.do_bench`` (median of single
   calls, the L2 cache flushed before each: cold weights, the calling overhead hidden behind the
   flush) and a CUDA graph of calls over rotating weight copies (more bytes than the L2 holds):
   back-to-back calls without Python, as a decode loop replayed from a graph runs them.
4. ``bench_decode_linears``: every linear of one decode step of a Llama-2-7B-shaped model (32 layers
   of q/k/v 4096 -> 12288, o 4096 -> 4096, gate/up 4096 -> 22016, down 11008 -> 4096, each layer its own
   weights), replayed from one CUDA graph: ternary W2A8 against bf16 cuBLAS. Attention, norms and the
   head are not in it (no GPU decode engine yet); it is the part of the step whose bytes shrink 8x.

Bandwidth is reported against a device-to-device copy measured in the same run (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from ternlm.errors import TernlmError
from ternlm.kernels import triton_kernels as tk

L2_FLUSH_BYTES = 256 << 20  # rotate through at least this many weight bytes in graph timings
LLAMA7B = dict(layers=32, d=4096, qkv=3 * 4096, ff=11008)
DEVICE = "cuda"  # tests point this at "cpu" (Triton's interpreter) with the timers replaced


def _require_cuda():
    if not tk.triton_available():
        raise TernlmError("the GPU benchmark needs Triton (pip install triton)")
    if not torch.cuda.is_available():
        raise TernlmError("the GPU benchmark needs a CUDA device; none is present")
    if tk.interpreting():
        raise TernlmError("TRITON_INTERPRET=1 is set: unset it to compile the kernels for the GPU")


def _valid_bytes(device) -> torch.Tensor:
    """The 81 bytes whose four 2-bit fields each hold a ternary code + 1 (0, 1 or 2)."""
    return torch.tensor([b for b in range(256) if all((b >> (2 * s)) & 3 < 3 for s in range(4))],
                        dtype=torch.uint8, device=device)


def random_packed(n: int, k: int, device, gen=None) -> torch.Tensor:
    """Random 2-bit packed ternary rows (every field a valid code; tail padding random too)."""
    from ternlm.quant.pack import packed_row_bytes

    valid = _valid_bytes(device)
    idx = torch.randint(0, valid.numel(), (n, packed_row_bytes(k, "2bit")), device=device, generator=gen)
    return valid[idx]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written (median of do_bench)."""
    from triton.testing import do_bench

    a = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    del a, b
    return 2 * nbytes / ms / 1e6


def time_graph(calls, replays: int = 20) -> float:
    """Microseconds per call: ``calls`` (closures) captured once into a CUDA graph, replayed; median."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (compile, allocator) outside the capture
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / len(calls))
    del g
    times.sort()
    return times[len(times) // 2]


def _eager(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


CHECK_SHAPES = ((1, 4096, 4096), (1, 4096, 11008), (1, 576, 576), (1, 1536, 576), (1, 576, 1536), (1, 300, 1000),
                (1, 33, 255), (1, 7, 100), (1, 301, 768), (3, 4096, 4096), (17, 70, 513), (200, 257, 768))


def check(seed: int = 0, shapes=CHECK_SHAPES) -> list[dict]:
    """The kernels on the GPU against the CPU reference; one row per case with 'ok'."""
    from ternlm.kernels import reference
    from ternlm.quant.pack import pack

    g = torch.Generator().manual_seed(seed)
    rows = []
    for M, N, K in shapes:
        codes = torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g)
        packed = pack(codes, "2bit")
        x = torch.randn(M, K, generator=g) * 3
        if N % 2:
            x[:, 0] = 40.0  # an outlier (odd N), or none
        bias = torch.randn(N, generator=g)
        scales = {"tensor": (torch.tensor(0.0371), None), "row": (torch.rand(N, generator=g) + 0.05, None)}
        for gs in (64, 128, 256):
            if K > gs:
                scales[f"g{gs}"] = (torch.rand(N, -(-K // gs), generator=g) + 0.05, gs)
        c = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        for name, (sc, gsz) in scales.items():
            for bits in (8, 4):
                got = tk.linear_a8_triton(c(x), c(packed), c(sc), K, c(bias), group_size=gsz, act_bits=bits).cpu()
                ref = reference.linear_a8(x, packed, sc, K, "2bit", bits, bias, group_size=gsz)
                rows.append(dict(case="W2A8", M=M, N=N, K=K, scale=name, bits=bits, ok=bool(torch.equal(got, ref)),
                                 max_abs=float((got - ref).abs().max())))
            for dt in (torch.float32, torch.bfloat16):
                got = tk.linear_a16_triton(c(x.to(dt)), c(packed), c(sc), K, c(bias), group_size=gsz).cpu()
                ref = reference.linear_a16(x.to(dt), packed, sc, K, "2bit", bias, group_size=gsz)
                rel = float((got - ref).norm() / ref.norm())
                rows.append(dict(case=f"W2A16 {str(dt)[6:]}", M=M, N=N, K=K, scale=name, bits=16,
                                 ok=rel < 1e-5, rel_err=rel))
    # round half to even at exact halves (absmax 127 -> scale 1)
    x = torch.zeros(1, 64)
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    packed = pack(torch.eye(64)[:8].to(torch.int8), "2bit")
    got = tk.linear_a8_triton(x.to(DEVICE), packed.to(DEVICE), torch.tensor(1.0, device=DEVICE), 64).cpu()
    ref = reference.linear_a8(x, packed, torch.tensor(1.0), 64)
    rows.append(dict(case="W2A8 halves", M=1, N=8, K=64, scale="tensor", bits=8, ok=bool(torch.equal(got, ref))))
    return rows


def sweep_gemv(n: int = 4096, k: int = 4096, configs=None) -> list[dict]:
    """Graph-timed one-token W2A8 at (n, k) for each split-K (BLOCK_N, BLOCK_B, num_warps), and the
    unsplit kernel at its default for comparison (kernel "rows"); fastest first."""
    configs = configs or [(bn, bb, w) for bn in (16, 32, 64) for bb in (1, 2, 4) for w in (2, 4, 8)]
    copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k // 4)))
    packs = [random_packed(n, k, DEVICE) for _ in range(copies)]
    scale = torch.rand(n, device=DEVICE) + 0.05
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    rows = []
    run = lambda: time_graph([lambda p=p: tk.linear_a8_triton(x, p, scale, k) for p in packs])  # noqa: E731
    for cfg in configs:
        with tk.tile_override(splitk=cfg):
            us = run()
        rows.append(dict(kernel="split-K", BLOCK_N=cfg[0], BLOCK_B=cfg[1], warps=cfg[2], us=us,
                         GBps=n * k / 4 / us / 1e3))
    with tk.tile_override(splitk_enabled=False):
        us = run()
        bn, bb, w, _ = tk.gemv_config(k, False)
    rows.append(dict(kernel="rows", BLOCK_N=bn, BLOCK_B=bb, warps=w, us=us, GBps=n * k / 4 / us / 1e3))
    rows.sort(key=lambda r: r["us"])
    return rows


def bench_gemv(shapes=((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (576, 576), (3072, 576)),
               batches=(1, 16, 128)) -> list[dict]:
    """W2A8 / W2A16 (Triton) against F.linear on bf16 weights (cuBLAS); microseconds per call."""
    rows = []
    for n, k in shapes:
        copies_b = max(2, math.ceil(L2_FLUSH_BYTES / (2 * n * k)))
        copies_t = max(2, math.ceil(L2_FLUSH_BYTES / (n * k // 4)))
        wb = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(copies_b)]
        wt = [random_packed(n, k, DEVICE) for _ in range(copies_t)]
        scale = torch.rand(n, device=DEVICE) + 0.05
        for m in batches:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            r = dict(out=n, inp=k, M=m, weight_MB_bf16=2 * n * k / 1e6, weight_MB_2bit=wt[0].numel() / 1e6)
            r["cublas_bf16_us"] = _eager(lambda: F.linear(x, wb[0]))
            r["w2a8_us"] = _eager(lambda: tk.linear_a8_triton(x, wt[0], scale, k))
            r["w2a16_us"] = _eager(lambda: tk.linear_a16_triton(x, wt[0], scale, k))
            r["cublas_bf16_graph_us"] = time_graph([lambda w=w: F.linear(x, w) for w in wb])
            r["w2a8_graph_us"] = time_graph([lambda w=w: tk.linear_a8_triton(x, w, scale, k) for w in wt])
            r["w2a16_graph_us"] = time_graph([lambda w=w: tk.linear_a16_triton(x, w, scale, k) for w in wt])
            rows.append(r)
        del wb, wt
        torch.cuda.empty_cache()
    return rows


def bench_decode_linears(layers: int = LLAMA7B["layers"], d: int = LLAMA7B["d"], qkv: int = LLAMA7B["qkv"],
                         ff: int = LLAMA7B["ff"]) -> dict:
    """All linears of one decode step (one token), per layer its own weights, from one CUDA graph."""
    shapes = [(qkv, d), (d, d), (2 * ff, d), (d, ff)]
    xs = {k: torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16) for k in {d, ff}}
    out = {}
    # ternary first (small), then bf16 (13 GB at the 7B shape)
    wt = [[(random_packed(n, k, DEVICE), torch.rand(n, device=DEVICE) + 0.05, k) for n, k in shapes]
          for _ in range(layers)]
    bytes_t = sum(p.numel() + s.numel() * 4 for layer in wt for p, s, _ in layer)
    calls = [lambda p=p, s=s, k=k: tk.linear_a8_triton(xs[k], p, s, k) for layer in wt for p, s, k in layer]
    out["w2a8_step_ms"] = time_graph(calls, replays=10) * len(calls) / 1e3
    out["w2a8_step_eager_ms"] = _eager(lambda: [c() for c in calls]) / 1e3
    del wt, calls
    torch.cuda.empty_cache()
    wb = [[torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(layers)]
    bytes_b = sum(w.numel() * 2 for layer in wb for w in layer)
    calls = [lambda w=w: F.linear(xs[w.shape[1]], w) for layer in wb for w in layer]
    out["bf16_step_ms"] = time_graph(calls, replays=10) * len(calls) / 1e3
    out["bf16_step_eager_ms"] = _eager(lambda: [c() for c in calls]) / 1e3
    del wb, calls
    torch.cuda.empty_cache()
    out.update(layers=layers, d=d, qkv=qkv, ff=ff, weight_GB_2bit=bytes_t / 1e9, weight_GB_bf16=bytes_b / 1e9)
    return out


def _fmt_table(rows, cols) -> str:
    lines = [" | ".join(f"{c:>{w}}" for c, w in cols)]
    for r in rows:
        cells = []
        for c, w in cols:
            v = r.get(c, "")
            cells.append(f"{v:>{w}.2f}" if isinstance(v, float) else f"{v!s:>{w}}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ternlm.bench.gpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every row to this JSON file")
    p.add_argument("--parts", default="check,sweep,gemv,decode",
                   help="comma-separated: check, sweep, gemv, decode (default: all)")
    a = p.parse_args(argv)
    try:
        _require_cuda()
    except TernlmError as e:
        raise SystemExit(f"gpu_bench: {e}") from None
    import triton

    parts = set(a.parts.split(","))
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    print(f"{res['device']}  torch {res['torch']}  triton {res['triton']}", flush=True)
    res["copy_GBps"] = copy_bandwidth()
    print(f"device-to-device copy: {res['copy_GBps']:.0f} GB/s (read + write)", flush=True)

    def save():
        if a.json:
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, a.json)

    if "check" in parts:
        res["check"] = rows = check()
        bad = [r for r in rows if not r["ok"]]
        print(f"\ncheck: {len(rows) - len(bad)}/{len(rows)} cases equal the CPU reference", flush=True)
        for r in bad:
            print("  FAILED", r)
        save()
    if "sweep" in parts:
        res["sweep"] = rows = sweep_gemv()
        print("\none-token W2A8 4096x4096, CUDA graph over rotating weights (fastest 8, and the unsplit kernel):")
        show = rows[:8] + [r for r in rows[8:] if r["kernel"] == "rows"]
        print(_fmt_table(show, [("kernel", 7), ("BLOCK_N", 7), ("BLOCK_B", 7), ("warps", 5), ("us", 7),
                                ("GBps", 7)]), flush=True)
        save()
    if "gemv" in parts:
        res["gemv"] = rows = bench_gemv()
        for r in rows:
            r["w2a8_speedup"] = r["cublas_bf16_us"] / r["w2a8_us"]
            r["w2a8_graph_speedup"] = r["cublas_bf16_graph_us"] / r["w2a8_graph_us"]
            r["w2a16_graph_speedup"] = r["cublas_bf16_graph_us"] / r["w2a16_graph_us"]
        print("\nlinear, microseconds per call (do_bench: cold L2, median; graph: rotating weights)")
        print(_fmt_table(rows, [("out", 6), ("inp", 6), ("M", 4), ("cublas_bf16_us", 14), ("w2a8_us", 8),
                                ("w2a8_speedup", 12), ("cublas_bf16_graph_us", 20), ("w2a8_graph_us", 13),
                                ("w2a16_graph_us", 14), ("w2a8_graph_speedup", 18),
                                ("w2a16_graph_speedup", 19)]), flush=True)
        save()
    if "decode" in parts:
        res["decode"] = r = bench_decode_linears()
        print(f"\ndecode-step linears, Llama-2-7B shape ({r['layers']} layers), one CUDA graph:")
        print(f"  W2A8 : {r['w2a8_step_ms']:.3f} ms/token ({r['weight_GB_2bit']:.2f} GB, "
              f"{r['weight_GB_2bit'] / r['w2a8_step_ms'] * 1e3:.0f} GB/s); eager {r['w2a8_step_eager_ms']:.3f} ms")
        print(f"  bf16 : {r['bf16_step_ms']:.3f} ms/token ({r['weight_GB_bf16']:.2f} GB, "
              f"{r['weight_GB_bf16'] / r['bf16_step_ms'] * 1e3:.0f} GB/s); eager {r['bf16_step_eager_ms']:.3f} ms")
        print(f"  speed-up {r['bf16_step_ms'] / r['w2a8_step_ms']:.2f}x (graph), "
              f"{r['bf16_step_eager_ms'] / r['w2a8_step_eager_ms']:.2f}x (eager)", flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
