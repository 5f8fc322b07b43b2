"""Decode benchmark: ternlm's runtime against HF transformers and llama.cpp, same model, same threads.

The model is GPT-2-shaped (config from ``BenchConfig.model_config``), randomly initialized with
ternary-valued block weights (speed does not depend on the values). Every system runs in its own
subprocess so its peak RSS is its own; every row reports decode and prefill tokens/s, model file
bytes, peak RSS, and achieved GB/s (weight bytes a decoded token reads / time per token) against
the copy bandwidth measured at the start of the run. Ratios are only meaningful within one run.

    ternlm bench --threads 2 --json bench.json      (or: python -m ternlm.bench ...)

With ``--model DIR`` it benchmarks that model instead (any directory ``ternlm.load`` reads; GPT-2 or
Llama architecture): the decode engine once per LM-head storage, HF ``generate`` on the same loaded
model, and llama.cpp on ``--llama-gguf FILE`` when named. Bytes per token come from the engine's own
weight accounting (ternlm), the model's parameters (HF) and the GGUF file size (llama.cpp, an upper bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from ternlm.bench.config import (BPW, DEFAULT_LLAMA_PYTHON, BenchConfig, bench_command,
                                 parse_variant)
from ternlm.bench.files import hf_config, prepare_files
from ternlm.bench.report import format_table, ratios
from ternlm.bench.workers import prompt_ids
from ternlm.errors import TernlmError

LLAMA_WORKER = Path(__file__).with_name("llama_worker.py")


def copy_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Best-of-N large tensor copy, counting bytes read + written."""
    import torch

    from ternlm.timing import time_calls

    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = min(time_calls(lambda: b.copy_(a), warmup=0, min_calls=repeats))
    return 2 * a.numel() * 4 / best / 1e9


def bytes_per_token(hc, linear_store: str, head_store: str, embed_row: str | None = None) -> int:
    """Weight bytes one decoded token reads: block linears, LM head, LayerNorms (KV cache excluded)."""
    C, L = hc.n_embd, hc.n_layer
    inner = hc.n_inner or 4 * C
    lin = L * (C * 3 * C + C * C + C * inner + inner * C)
    head = hc.vocab_size * C
    small = L * (4 * C + 3 * C + C + inner + C) + 2 * C  # LN weights + linear biases (fp32)
    return int(lin * BPW[linear_store] + head * BPW[head_store] + small * 4)


def _run_worker(kind: str, spec: dict, python: str | None = None, timeout: float = 1800) -> dict:
    if kind == "llama_cpp":
        cmd = [python, str(LLAMA_WORKER), json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "ternlm.bench.workers", kind, json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise TernlmError(f"{kind} worker failed (rc {r.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


def _llama_python(cfg: BenchConfig) -> tuple[str | None, str]:
    """(interpreter that imports llama_cpp, why not) -- this one first, then the benchmark venv."""
    cands = [cfg.llama_python] if cfg.llama_python else [sys.executable, DEFAULT_LLAMA_PYTHON]
    for py in cands:
        if py and Path(py).exists():
            r = subprocess.run([py, "-c", "import llama_cpp, numpy"], capture_output=True, text=True)
            if r.returncode == 0:
                return py, ""
    return None, f"llama_cpp is not importable from {', '.join(c for c in cands if c)}"


# ---------------------------------------------------------------------------------------------
# Driver


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Build the model files, run every system in its own subprocess, return the results dict."""
    if cfg.model:
        return _run_model_bench(cfg, log)
    tmp = None
    if cfg.workdir:
        work = Path(cfg.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ternlm-bench-")
        work = Path(tmp.name)
    try:
        hc = hf_config(cfg)
        log(f"model: GPT-2 n_layer={hc.n_layer} n_embd={hc.n_embd} vocab={hc.vocab_size}; "
            f"{cfg.prompt_tokens}-token prompt, {cfg.new_tokens} greedy tokens, {cfg.threads} threads")
        bw = copy_bandwidth_gbs()
        log(f"copy bandwidth: {bw:.1f} GB/s")
        files = prepare_files(cfg, work, log)
        base_spec = {"threads": cfg.threads, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                     "repeats": cfg.repeats, "vocab_size": hc.vocab_size, "seed": cfg.seed, "hf_dir": files["hf_dir"],
                     "gelu": cfg.gelu}
        skipped: list[dict] = []
        # (system, variant, worker kind, spec, interpreter, row extras as a function of the result)
        jobs: list[tuple] = []

        if "ternlm" in cfg.systems:
            for i, v in enumerate(cfg.ternlm_variants):
                act, fmt, head = parse_variant(v)
                spec = {**base_spec, "variant": v, "ckpt_dir": files.get(f"ternlm_{fmt}_dir"),
                        "profile": cfg.profile and i == 0}

                def extras(res, fmt=fmt, head=head):
                    wb = res.pop("weight_bytes")
                    return (files.get(f"ternlm_{fmt}_bytes"), wb["linears"] + wb["head"] + wb["other"],
                            {"head": head})
                jobs.append(("ternlm", v, "ternlm", spec, None, extras))
        if "hf" in cfg.systems:
            for v in cfg.hf_variants:
                store = "fp32" if v == "fp32" else "bf16"
                size = files["hf_bytes"] if v == "fp32" else files["hf_bytes"] // 2
                jobs.append(("hf", v, "hf", {**base_spec, "variant": v}, None,
                             lambda res, size=size, store=store, v=v: (res.pop("param_bytes", None) and size,
                                                                       bytes_per_token(hc, store, store), {"head": v})))
        if "llama_cpp" in cfg.systems:
            py, why = _llama_python(cfg)
            for v in cfg.llama_variants:
                reason = why or files.get(f"gguf_{v}_skip")
                if reason:
                    skipped.append({"system": "llama_cpp", "variant": v, "reason": reason})
                    log(f"  llama.cpp {v}: skipped ({reason})")
                    continue
                lin, head = (v.split("-") if "-" in v else (v, v))
                spec = {**base_spec, "variant": v, "gguf": files[f"gguf_{v}"], "ids": prompt_ids(base_spec).tolist()}
                jobs.append(("llama_cpp", v, "llama_cpp", spec, py,
                             lambda res, v=v, lin=lin, head=head: (
                                 files[f"gguf_{v}_bytes"], bytes_per_token(hc, lin, head),
                                 {"head": {"f16": "fp16", "q8_0": "int8"}[head], "gguf_tool": files.get(f"gguf_{v}_tool")})))

        rows, skipped = _run_jobs(cfg, jobs, bw, skipped, log)
        return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": bw,
                "machine": _machine(),
                "files": {k: v for k, v in files.items() if k.endswith("_bytes") or k.endswith("_tool")},
                "rows": rows, "skipped": skipped}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _machine() -> dict:
    import platform

    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def _dir_bytes(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _run_model_bench(cfg: BenchConfig, log=print) -> dict:
    """``--model DIR``: the engine (one row per head storage) vs HF generate vs llama.cpp on a named GGUF."""
    log(f"model: {cfg.model}; {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} greedy tokens, {cfg.threads} threads")
    bw = copy_bandwidth_gbs()
    log(f"copy bandwidth: {bw:.1f} GB/s")
    # NOTE: prompt ids below 1000 are valid tokens of every supported vocabulary, so all systems
    # see the same prompt without the parent loading the model
    base_spec = {"threads": cfg.threads, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                 "repeats": cfg.repeats, "vocab_size": 1000, "seed": cfg.seed, "model_dir": cfg.model, "gelu": cfg.gelu}
    size = _dir_bytes(cfg.model)
    jobs, skipped = [], []
    if "ternlm" in cfg.systems:
        heads = list(dict.fromkeys(parse_variant(v)[2] for v in cfg.ternlm_variants))
        for i, head in enumerate(heads):
            def extras(res, head=head):
                wb = res.pop("weight_bytes")
                return size, wb["linears"] + wb["head"] + wb["other"], {"head": head}
            jobs.append(("ternlm", f"engine-{head}", "ternlm",
                         {**base_spec, "head": head, "profile": cfg.profile and i == 0}, None, extras))
    if "hf" in cfg.systems:
        jobs.append(("hf", "generate", "hf", {**base_spec, "variant": "fp32"}, None,
                     lambda res: (size, res.pop("param_bytes"), {"head": "model"})))
    if "llama_cpp" in cfg.systems:
        if not cfg.llama_gguf:
            skipped.append({"system": "llama_cpp", "variant": "gguf", "reason": "no --llama-gguf file named"})
        else:
            py, why = _llama_python(cfg)
            if why:
                skipped.append({"system": "llama_cpp", "variant": Path(cfg.llama_gguf).name, "reason": why})
                log(f"  llama.cpp: skipped ({why})")
            else:
                gsize = os.path.getsize(cfg.llama_gguf)
                jobs.append(("llama_cpp", Path(cfg.llama_gguf).name, "llama_cpp",
                             {**base_spec, "gguf": cfg.llama_gguf, "ids": prompt_ids(base_spec).tolist()}, py,
                             lambda res: (gsize, gsize, {"head": "gguf"})))
    rows, skipped = _run_jobs(cfg, jobs, bw, skipped, log)
    peer = next((r for r in rows if r["system"] == "llama_cpp"), None)
    hf = next((r for r in rows if r["system"] == "hf"), None)
    for r in rows:
        r["x_hf_fp32"] = r["decode_tok_s"] / hf["decode_tok_s"] if hf else None  # HF generate, same model
        r["x_llama_gguf"] = r["decode_tok_s"] / peer["decode_tok_s"] if peer and r["system"] == "ternlm" else None
    return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": bw, "machine": _machine(),
            "files": {"model_bytes": size}, "rows": rows, "skipped": skipped}


def _run_jobs(cfg: BenchConfig, jobs: list, bw: float, skipped: list, log) -> tuple[list, list]:
    rows: list[dict] = []
    if jobs:
        # NOTE: rounds run every system once per round, round-robin, and keep each one's best: on a
        # shared machine the load drifts over minutes, and interleaving spreads that drift evenly.
        best: dict[tuple, dict] = {}
        failed: set = set()
        for rnd in range(cfg.rounds):
            if cfg.rounds > 1:
                log(f" round {rnd + 1}/{cfg.rounds}")
            for system, v, kind, spec, py, _ in jobs:
                if (system, v) in failed:
                    continue
                try:
                    res = _run_worker(kind, {**spec, "profile": spec.get("profile") and rnd == 0}, python=py)
                except Exception as e:
                    failed.add((system, v))
                    skipped.append({"system": system, "variant": v, "reason": str(e)})
                    log(f"  {system} {v}: failed ({e})")
                    continue
                log(f"  {system:9s} {v:14s} decode {res['decode_tok_s']:7.1f} tok/s  "
                    f"prefill {res['prefill_tok_s']:7.1f} tok/s")
                old = best.get((system, v))
                if old is None:
                    best[(system, v)] = res
                else:
                    for k in ("decode_tok_s", "prefill_tok_s"):
                        old[k] = max(old[k], res[k])
                    old["peak_rss_mb"] = max(old["peak_rss_mb"], res["peak_rss_mb"])
        for system, v, _, _, _, extras in jobs:
            res = best.get((system, v))
            if res is None:
                continue
            file_bytes, bpt, extra = extras(res)
            row = {"system": system, "variant": v, **res, "file_bytes": file_bytes, "bytes_per_token": bpt, **extra}
            row["achieved_gbs"] = bpt * res["decode_tok_s"] / 1e9
            row["pct_of_copy_bw"] = 100 * row["achieved_gbs"] / bw
            rows.append(row)
        ratios(rows)
    return rows, skipped


def bench_main(args) -> dict:
    """CLI entry: ``args`` is a BenchConfig or any object with (some of) its fields as attributes."""
    if isinstance(args, BenchConfig):
        cfg = args
    else:
        kw = {}
        for f in fields(BenchConfig):
            v = getattr(args, f.name, None)
            if v is None:
                continue
            if f.name.endswith(("systems", "variants")) and isinstance(v, str):
                v = tuple(x for x in v.split(",") if x)
            kw[f.name] = v
        cfg = BenchConfig(**kw)
    print(f"ternlm bench config: {json.dumps(cfg.to_dict(), sort_keys=True)}")
    res = run_bench(cfg)
    print(format_table(res))
    if getattr(args, "kernels", False):
        from ternlm.bench import microbench

        print("\nkernel micro-benchmark (GPT-2 shapes, ternlm W2A8/W2A16 vs torch fp32 F.linear):")
        micro = microbench.run(threads=cfg.threads)
        print(microbench.format_table(micro))
        res["kernels"] = micro
    if cfg.json:
        from ternlm.fileio import atomic_write_text

        atomic_write_text(Path(cfg.json), json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {cfg.json}")
    return res
