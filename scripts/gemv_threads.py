"""One-token GEMV time on one and on two kernel threads, weights in cache, for SmolLM2-135M's layer shapes.

    python scripts/gemv_threads.py

Prints microseconds per call (best of 7 x 500 calls of a bound linear, after 200 warm-up calls; one
Python call of a 1 x 64 linear is printed first, for the fixed cost). The weights stay in cache, so
this measures the tile's arithmetic and the thread hand-off, not memory: the README's SmolLM2 roofline
discussion quotes it. Random codes and scales; speed does not depend on the values.
"""

import time

import torch

from ternlm.kernels import bind_linear, set_num_threads
from ternlm.quant.pack import pack

SHAPES = [(576, 576, 64), (960, 576, 64), (3072, 576, 64), (576, 1536, 64), (576, 576, None)]  # (out, in, group)


def per_call_us(f, x, out, calls=500, repeats=7) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            f(x, out)
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main() -> None:
    torch.manual_seed(0)
    f = bind_linear(pack(torch.ones(1, 64, dtype=torch.int8), "2bit"), torch.tensor(1.0), 64)
    print(f"one Python call of a 1 x 64 linear: {per_call_us(f, torch.randn(1, 64), torch.empty(1, 1), 2000):.2f} us")
    print(f"{'out':>5} {'in':>5} {'group':>6} | {'1 thread':>9} {'2 threads':>9}")
    for n, k, g in SHAPES:
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        scale = torch.rand(n, k // g) + 0.05 if g else torch.tensor(0.03)
        f = bind_linear(pack(codes, "2bit"), scale, k, group_size=g)
        x, out = torch.randn(1, k), torch.empty(1, n)
        best = {}
        for nth in (1, 2, 1, 2):  # interleaved, best of both passes
            set_num_threads(nth)
            for _ in range(200):
                f(x, out)
            best[nth] = min(best.get(nth, float("inf")), per_call_us(f, x, out))
        print(f"{n:>5} {k:>5} {g or 'tensor':>6} | {best[1]:>7.2f}us {best[2]:>7.2f}us")


if __name__ == "__main__":
    main()
