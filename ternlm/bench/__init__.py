"""Benchmarks: ternlm's decode engine against HF transformers and llama.cpp (``ternlm bench``).

    config.py        BenchConfig, variants, command-line flags
    files.py         the model files every system reads
    workers.py       ternlm and HF workers (one fresh process each)
    llama_worker.py  the llama.cpp worker, run by path under the peer's interpreter
    run.py           the driver: rounds over systems, rows, bandwidth
    report.py        ratios and the printed table
"""

_LAZY = {
    "BenchConfig": "ternlm.bench.config",
    "bench_command": "ternlm.bench.config",
    "add_arguments": "ternlm.bench.config",
    "run_bench": "ternlm.bench.run",
    "bench_main": "ternlm.bench.run",
    "format_table": "ternlm.bench.report",
}


from ternlm._lazy import lazy_exports  # noqa: E402

__getattr__, __all__ = lazy_exports("ternlm.bench", _LAZY)
