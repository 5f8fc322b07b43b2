"""The one timer: repeated wall-clock measurement of a call, for benchmarks and latency reports.

    times = time_calls(fn, warmup=2, min_calls=5, min_time=0.3, max_calls=200)
    best, median = min(times), statistics.median(times)

Tests never assert on what it returns.
"""

from __future__ import annotations

import time
from typing import Callable


def time_calls(fn: Callable[[], object], *, warmup: int = 1, min_calls: int = 5, min_time: float = 0.0,
               max_calls: int | None = None, sync: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of ``fn()``: ``warmup`` untimed calls, then at least ``min_calls`` timed ones,
    more until ``min_time`` seconds have passed (at most ``max_calls``). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read, so asynchronous work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < min_time
                                     and (max_calls is None or len(times) < max_calls)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times
