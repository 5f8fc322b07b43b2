"""Decode benchmark: ternlm's runtime against HF transformers and llama.cpp, same model, same threads.

The model is GPT-2-shaped (config from ``BenchConfig.model_config``), randomly initialized with
ternary-valued block weights (speed does not depend on the values). Every system runs in its own
subprocess so its peak RSS is its own; every row reports decode and prefill tokens/s, model file
bytes, peak RSS, and achieved GB/s (weight bytes a decoded token reads / time per token) against
the copy bandwidth measured at the start of the run. Ratios are only meaningful within one run, whose
environment (git commit, CPU model, threads, ternlm's kernel level) the results and the table record.

    ternlm bench --threads 2 --json bench.json      (or: python -m ternlm.bench ...)

With ``--model DIR`` it benchmarks that model instead (any directory ``ternlm.load`` reads; GPT-2 or
Llama architecture): the decode engine once per LM-head storage, HF ``generate`` on the same loaded
model, and llama.cpp on each ``--llama-gguf FILE`` (repeatable; in either mode, one row per file, named
after its stem: e.g. a Q2_K or IQ2_M file of about ternlm's bytes from scripts/llama_quants.py). Every
GGUF is timed twice when llama.cpp's ``llama-bench`` is there (``--llama-bench``): through the Python
bindings (system ``llama_cpp``, the same loop as the other workers) and by llama-bench itself (system
``llama_bench``, without the bindings' per-token overhead).

Bytes per token count the weights one decode step reads, the same way for every system: every block
tensor, the LM head and one row of each embedding table (all of a table that is also the head), KV
cache excluded -- from the engine's own accounting (ternlm), the loaded parameters (HF) and the GGUF
file's tensors (llama.cpp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from ternlm.bench.config import (DEFAULT_LLAMA_PYTHON, BenchConfig, bench_command, gguf_name, llama_bench_tool,
                                 parse_variant)
from ternlm.bench.files import hf_config, prepare_files
from ternlm.bench.report import environment_line, format_table, ratios
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


# GGUF tables a decode step reads one row of (token_embd in full when there is no output.weight: tied head)
GGUF_EMBEDDINGS = ("token_embd.weight", "position_embd.weight", "token_types.weight")


def gguf_bytes_per_token(path) -> int:
    """Weight bytes one decoded token reads from a GGUF file, counted from its tensors: all of every
    tensor (blocks, norms, output head) but one row of each embedding table (KV cache excluded)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a file that is not GGUF
        raise TernlmError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        if t.name in GGUF_EMBEDDINGS and not (t.name == "token_embd.weight" and "output.weight" not in names):
            rows = 1
            for d in t.shape[1:]:  # ggml order: the row length first
                rows *= int(d)
            nbytes //= max(rows, 1)
        total += nbytes
    return total


def _run_worker(kind: str, spec: dict, python: str | None = None, timeout: float = 1800) -> dict:
    if kind == "llama_cpp":
        cmd = [python, str(LLAMA_WORKER), json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "ternlm.bench.workers", kind, json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if kind == "llama_cpp" and r.returncode < 0 and spec.get("repack", True):
        # llama.cpp's repacked CPU weights (AMX) crash on some CPUs: once more without them, and say so
        out = _run_worker(kind, {**spec, "repack": False}, python, timeout)
        out["retried_without_repack"] = True
        return out
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
    for g in cfg.llama_gguf:  # a file that is not GGUF fails now, not after the model files are built
        gguf_bytes_per_token(g)
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
        env = environment(cfg.threads)
        log(environment_line(env))
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
                size = files["hf_bytes"] if v == "fp32" else files["hf_bytes"] // 2
                jobs.append(("hf", v, "hf", {**base_spec, "variant": v}, None,
                             lambda res, size=size, v=v: (res.pop("param_bytes", None) and size,
                                                          res.pop("decode_bytes"), {"head": v})))
        if "llama_cpp" in cfg.systems:
            ggufs = []
            for v in cfg.llama_variants:
                reason = files.get(f"gguf_{v}_skip")
                if reason:
                    skipped.append({"system": "llama_cpp", "variant": v, "reason": reason})
                    log(f"  llama.cpp {v}: skipped ({reason})")
                    continue
                head = v.split("-")[1] if "-" in v else v
                ggufs.append((v, files[f"gguf_{v}"], {"head": {"f16": "fp16", "q8_0": "int8"}[head],
                                                      "gguf_tool": files.get(f"gguf_{v}_tool")}))
            ggufs += [(gguf_name(g), g, {"head": "gguf", "gguf_file": g}) for g in cfg.llama_gguf]
            jobs += _llama_jobs(cfg, ggufs, base_spec, skipped, log)

        rows, skipped = _run_jobs(cfg, jobs, bw, skipped, log)
        return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": bw,
                "machine": env,
                "files": {k: v for k, v in files.items() if k.endswith("_bytes") or k.endswith("_tool")},
                "rows": rows, "skipped": skipped}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _llama_jobs(cfg: BenchConfig, ggufs: list, base_spec: dict, skipped: list, log) -> list:
    """Jobs for llama.cpp on each (row name, GGUF path, row extras): the Python bindings' worker, and
    llama.cpp's own llama-bench when it is there. Both rows count the bytes from the file's tensors."""
    if not ggufs:
        return []
    py, why = _llama_python(cfg)
    tool, tool_why = llama_bench_tool(cfg)
    ids = prompt_ids(base_spec).tolist()
    jobs = []
    for name, path, extra in ggufs:
        size, bpt = os.path.getsize(path), gguf_bytes_per_token(path)

        def extras(res, size=size, bpt=bpt, extra=extra):
            return size, bpt, dict(extra)
        if why:
            skipped.append({"system": "llama_cpp", "variant": name, "reason": why})
            log(f"  llama.cpp {name}: skipped ({why})")
        else:
            jobs.append(("llama_cpp", name, "llama_cpp", {**base_spec, "gguf": path, "ids": ids}, py, extras))
        if tool:
            jobs.append(("llama_bench", name, "llama_bench", {**base_spec, "gguf": path, "llama_bench": tool}, None,
                         extras))
    if not tool and cfg.llama_bench != "off":
        skipped.append({"system": "llama_bench", "variant": "all", "reason": tool_why})
        log(f"  llama-bench: skipped ({tool_why})")
    return jobs


# ---------------------------------------------------------------------------------------------
# What the numbers were measured on


def git_state(path=None) -> tuple[str, bool | None]:
    """(short commit, tree dirty) of the git checkout ``path`` (default: the one ternlm is imported
    from), or ("unknown", None) outside one -- an installed ternlm inside another repository's tree
    counts as outside. Untracked files do not make the tree dirty."""
    root = Path(path) if path else Path(__file__).resolve().parents[2]

    def git(*a):
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=20)
        if r.returncode:
            raise OSError(r.stderr.strip())
        return r.stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return "unknown", None
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, no commit yet
        return "unknown", None


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, sysctl on macOS, else what ``platform`` says."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and val.strip():
                    return val.strip()
    except OSError:
        pass
    try:
        r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        cores, phys = set(), "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "physical id":
                    phys = val.strip()
                elif key.strip() == "core id":
                    cores.add((phys, val.strip()))
        return len(cores) or None
    except OSError:
        return None


def kernel_level() -> str | None:
    """The dispatch level ternlm's compiled kernels run at here (what the ternlm workers report), or None
    when the extension is not importable (the reference kernels run)."""
    import warnings

    from ternlm.kernels import get_level

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_level()
    except TernlmError:  # TERNLM_REQUIRE_KERNELS=1 without the extension: the workers fail and say so
        return None


def environment(threads: int) -> dict:
    """What a run's numbers depend on beyond its config: code version, CPU, threads, kernel level."""
    import platform

    import torch

    import ternlm

    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "ternlm": ternlm.__version__, "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "physical_cores": physical_cores(), "threads": threads,
            "kernel_level": kernel_level(), "platform": platform.platform(), "torch": torch.__version__,
            "python": platform.python_version()}


def _dir_bytes(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _run_model_bench(cfg: BenchConfig, log=print) -> dict:
    """``--model DIR``: the engine (one row per head storage) vs HF generate vs llama.cpp on a named GGUF."""
    env = environment(cfg.threads)
    log(environment_line(env))
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
        def hf_extras(res):
            res.pop("param_bytes")
            return size, res.pop("decode_bytes"), {"head": "model"}
        jobs.append(("hf", "generate", "hf", {**base_spec, "variant": "fp32"}, None, hf_extras))
    if "llama_cpp" in cfg.systems:
        if not cfg.llama_gguf:
            skipped.append({"system": "llama_cpp", "variant": "gguf", "reason": "no --llama-gguf file named"})
        jobs += _llama_jobs(cfg, [(gguf_name(g), g, {"head": "gguf", "gguf_file": g}) for g in cfg.llama_gguf],
                            base_spec, skipped, log)
    rows, skipped = _run_jobs(cfg, jobs, bw, skipped, log)
    # ratios against the first --llama-gguf file: through the bindings and by llama-bench
    first = gguf_name(cfg.llama_gguf[0]) if cfg.llama_gguf else None
    peer = next((r for r in rows if r["system"] == "llama_cpp" and r["variant"] == first), None)
    lb = next((r for r in rows if r["system"] == "llama_bench" and r["variant"] == first), None)
    hf = next((r for r in rows if r["system"] == "hf"), None)
    for r in rows:
        r["x_hf_fp32"] = r["decode_tok_s"] / hf["decode_tok_s"] if hf else None  # HF generate, same model
        r["x_llama_gguf"] = r["decode_tok_s"] / peer["decode_tok_s"] if peer and r["system"] == "ternlm" else None
        r["x_llama_bench"] = r["decode_tok_s"] / lb["decode_tok_s"] if lb and r["system"] == "ternlm" else None
    return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": bw, "machine": env,
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
                log(f"  {system:11s} {v:14s} decode {res['decode_tok_s']:7.1f} tok/s  "
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
            elif f.name == "llama_gguf":  # repeatable flag: a list (or one path)
                v = (v,) if isinstance(v, str) else tuple(v)
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
