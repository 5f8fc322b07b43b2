"""Decode benchmark: ternlm's runtime against HF transformers and llama.cpp, same model, same threads.

The model is GPT-2-shaped (config from ``BenchConfig.model_config``), randomly initialized with
ternary-valued block weights (speed does not depend on the values). Every system runs in its own
subprocess so its peak RSS is its own; every row reports decode and prefill tokens/s, model file
bytes, peak RSS, and achieved GB/s (weight bytes a decoded token reads / time per token) against
the copy bandwidth measured at the start of the run. Ratios are only meaningful within one run.

    ternlm bench --threads 2 --json bench.json      (or: python -m ternlm.bench ...)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ternlm.errors import TernlmError

# ternlm variants: activation path, packed format, LM-head storage
TERNLM_VARIANTS = ("a8-2bit-fp32", "a8-2bit-int8", "a8-2bit-fp16", "a16-2bit-int8", "a8-base3-int8")
HF_VARIANTS = ("fp32", "bf16")
# llama.cpp files: ternary TQ2_0 blocks with an f16 or q8_0 head/embedding, and all-f16
LLAMA_VARIANTS = ("tq2_0-f16", "tq2_0-q8_0", "f16")
# bytes per weight of each storage, for the bytes-per-token estimate
_BPW = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "2bit": 0.25, "base3": 0.2, "tq2_0": 66 / 256,
        "q8_0": 34 / 32, "f16": 2.0}
# which llama.cpp file has the same LM-head precision as a ternlm head
_SAME_HEAD = {"fp16": "tq2_0-f16", "int8": "tq2_0-q8_0"}  # fp32 / bf16 heads have no llama.cpp twin here
# the peer's interpreter and converter, as scripts/setup_llama_peer.sh builds them (or set the variables)
DEFAULT_LLAMA_PYTHON = os.environ.get("TERNLM_LLAMA_PYTHON", ".venv-llama/bin/python")
DEFAULT_CONVERT_SCRIPT = ".venv-llama/llama.cpp/convert_hf_to_gguf.py"


@dataclass
class BenchConfig:
    model_config: str = field(default_factory=lambda: os.path.join(
        os.environ.get("TERNLM_DATA_DIR", "../shared/data"), "gpt2-tokenizer"))
    prompt_tokens: int = 16
    new_tokens: int = 128
    threads: int = 2
    repeats: int = 3
    rounds: int = 1                   # round-robin passes over every system; best of all is kept
    systems: tuple = ("ternlm", "hf", "llama_cpp")
    ternlm_variants: tuple = TERNLM_VARIANTS
    hf_variants: tuple = HF_VARIANTS
    llama_variants: tuple = LLAMA_VARIANTS
    gelu: str = "tanh"                # runtime GELU (see ternlm.runtime.gpt2.RuntimeConfig)
    llama_python: str | None = None   # default: this interpreter if it imports llama_cpp, else DEFAULT_LLAMA_PYTHON
    overrides: dict = field(default_factory=dict)  # GPT2Config fields (tests shrink the model)
    workdir: str | None = None        # keep model files here (default: a temporary directory)
    json: str | None = None
    profile: bool = True              # per-component decode breakdown for the first ternlm variant
    seed: int = 0

    def __post_init__(self):
        self.systems = tuple(self.systems)
        self.ternlm_variants = tuple(self.ternlm_variants)
        self.hf_variants = tuple(self.hf_variants)
        self.llama_variants = tuple(self.llama_variants)
        for s in self.systems:
            if s not in ("ternlm", "hf", "llama_cpp"):
                raise TernlmError(f"unknown system {s!r}; choose ternlm, hf, llama_cpp")
        for v in self.ternlm_variants:
            _parse_variant(v)
        if not set(self.hf_variants) <= set(HF_VARIANTS):
            raise TernlmError(f"hf variants are {HF_VARIANTS}")
        if not set(self.llama_variants) <= set(LLAMA_VARIANTS):
            raise TernlmError(f"llama.cpp variants are {LLAMA_VARIANTS}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.threads < 1 or self.repeats < 1 or self.rounds < 1:
            raise TernlmError("prompt_tokens >= 1, new_tokens >= 2, threads >= 1, repeats >= 1, rounds >= 1 "
                              "are required")

    def to_dict(self) -> dict:
        return asdict(self)


def _parse_variant(v: str) -> tuple:
    try:
        act, fmt, head = v.split("-")
    except ValueError:
        raise TernlmError(f"ternlm variant {v!r} must read ACT-FORMAT-HEAD, e.g. a8-2bit-int8") from None
    if act not in ("a8", "a16") or fmt not in ("2bit", "base3") or head not in ("fp32", "fp16", "bf16", "int8"):
        raise TernlmError(f"bad ternlm variant {v!r}: act a8|a16, format 2bit|base3, head fp32|fp16|bf16|int8")
    return (8 if act == "a8" else None), fmt, head


# ---------------------------------------------------------------------------------------------
# Model files


def _hf_config(cfg: BenchConfig):
    from transformers import GPT2Config

    hc = GPT2Config.from_pretrained(cfg.model_config)
    for k, v in cfg.overrides.items():
        setattr(hc, k, v)
    if "n_positions" in cfg.overrides and "n_ctx" not in cfg.overrides:
        hc.n_ctx = hc.n_positions  # GGUF converters take the context length from n_ctx
    return hc


def make_model(cfg: BenchConfig):
    """GPT-2 with random weights whose block linears are ternary-valued (codes * scale in float)."""
    import torch
    from transformers import GPT2LMHeadModel

    from ternlm.config import TernaryConfig
    from ternlm.nn.surgery import block_linear_layers
    from ternlm.quant.ternary import fake_quantize_ternary

    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(_hf_config(cfg)).eval()
    with torch.no_grad():
        for name in block_linear_layers(model):
            w = model.get_submodule(name).weight
            w.copy_(fake_quantize_ternary(w, TernaryConfig()))
    return model


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf"))


def prepare_files(cfg: BenchConfig, work: Path, log) -> dict:
    """HF dir (+ tokenizer), ternlm checkpoints per format, GGUF files; returns their paths and sizes."""
    from transformers import AutoTokenizer

    files: dict = {"hf_dir": str(work / "hf")}
    model = make_model(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model_config)
    model.save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    files["hf_bytes"] = _dir_bytes(work / "hf")

    fmts = sorted({_parse_variant(v)[1] for v in cfg.ternlm_variants}) if "ternlm" in cfg.systems else []
    need_gguf = "llama_cpp" in cfg.systems and any(v.startswith("tq2_0") for v in cfg.llama_variants)
    if need_gguf and "2bit" not in fmts:
        fmts.append("2bit")
    from ternlm.checkpoint import save_pretrained
    from ternlm.config import TernaryConfig
    from ternlm.convert import convert

    for fmt in fmts:
        m = convert(make_model(cfg), TernaryConfig(act_bits=8), fmt=fmt)
        d = save_pretrained(m, tok, work / f"ternlm-{fmt}", float_dtype="fp16")
        files[f"ternlm_{fmt}_dir"] = str(d)
        files[f"ternlm_{fmt}_bytes"] = _dir_bytes(Path(d))

    if "llama_cpp" in cfg.systems:
        for v in cfg.llama_variants:
            out = work / f"model-{v}.gguf"
            try:
                if v.startswith("tq2_0"):
                    from ternlm.export.gguf import export_gguf

                    export_gguf(files["ternlm_2bit_dir"], out, "tq2_0", head_dtype=v.split("-")[1])
                    files[f"gguf_{v}_tool"] = "ternlm.export.gguf.export_gguf"
                else:
                    _peer_convert(files["hf_dir"], out, v)
                    files[f"gguf_{v}_tool"] = "convert_hf_to_gguf.py"
                files[f"gguf_{v}"] = str(out)
                files[f"gguf_{v}_bytes"] = out.stat().st_size
            except Exception as e:  # a missing exporter or converter skips that row, with the reason
                files[f"gguf_{v}_skip"] = f"{type(e).__name__}: {e}"
                log(f"  llama.cpp {v}: no GGUF ({files[f'gguf_{v}_skip']})")
    return files


def _peer_convert(hf_dir: str, out: Path, outtype: str) -> None:
    """llama.cpp's own converter (shipped in llama-cpp-python's sdist) for the peer's float files."""
    candidates = [os.environ.get("LLAMA_CONVERT_HF_TO_GGUF"), DEFAULT_CONVERT_SCRIPT]
    script = next((c for c in candidates if c and Path(c).is_file()), None)
    if script is None:
        raise TernlmError("convert_hf_to_gguf.py not found (set LLAMA_CONVERT_HF_TO_GGUF)")
    env = dict(os.environ)
    gguf_py = Path(script).parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = str(gguf_py) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, script, hf_dir, "--outtype", outtype, "--outfile", str(out)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise TernlmError(f"convert_hf_to_gguf.py failed: {r.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------------------------
# Measurements in the parent


def copy_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Best-of-N large tensor copy, counting bytes read + written."""
    import torch

    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def bytes_per_token(hc, linear_store: str, head_store: str, embed_row: str | None = None) -> int:
    """Weight bytes one decoded token reads: block linears, LM head, LayerNorms (KV cache excluded)."""
    C, L = hc.n_embd, hc.n_layer
    inner = hc.n_inner or 4 * C
    lin = L * (C * 3 * C + C * C + C * inner + inner * C)
    head = hc.vocab_size * C
    small = L * (4 * C + 3 * C + C + inner + C) + 2 * C  # LN weights + linear biases (fp32)
    return int(lin * _BPW[linear_store] + head * _BPW[head_store] + small * 4)


# ---------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process and prints one JSON line


def _rss_mb() -> float:
    """Peak RSS of this process image (VmHWM): unlike ru_maxrss it does not inherit the forking
    parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_ternlm(spec: dict) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    from ternlm.config import TernaryConfig
    from ternlm.convert import convert
    from ternlm.kernels import get_level, set_num_threads
    from ternlm.runtime.gpt2 import GPT2Runtime, RuntimeConfig

    torch.set_num_threads(spec["threads"])
    set_num_threads(spec["threads"])
    base = _rss_mb()
    act, fmt, head = _parse_variant(spec["variant"])
    ckpt = spec.get("ckpt_dir")
    if ckpt and act == 8:
        from ternlm.checkpoint import from_pretrained

        model = from_pretrained(ckpt)
    else:
        model = convert(GPT2LMHeadModel.from_pretrained(spec["hf_dir"]).eval(), TernaryConfig(act_bits=act), fmt=fmt)
    rt = GPT2Runtime(model, RuntimeConfig(head=head, gelu=spec["gelu"],
                                          max_seq_len=spec["prompt_tokens"] + spec["new_tokens"]))
    del model  # the runtime holds what it needs
    ids = _prompt(spec)
    rt.generate(ids, 4)  # warm-up: thread pool, allocator, first-touch of every weight page
    runs = [rt.generate(ids, spec["new_tokens"]) for _ in range(spec["repeats"])]
    out = {"decode_tok_s": max(r["decode_tok_s"] for r in runs), "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
           "n_new_tokens": runs[0]["n_new_tokens"], "weight_bytes": rt.weight_bytes(), "kernel_level": get_level(),
           "baseline_rss_mb": base, "peak_rss_mb": _rss_mb()}
    if spec.get("profile"):
        out["profile"] = decode_profile(rt, ids, spec["threads"])
    return out


def decode_profile(rt, ids, threads: int, steps: int = 32) -> dict:
    """Where a decode step's time goes: ms per token in block linears, LM head, and the rest."""
    import torch

    def best(fn, n=steps):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts) * 1e3

    with rt.decoding(), torch.inference_mode():
        rt.prefill(ids)
        step = best(lambda: (rt.decode_step(1), setattr(rt, "pos", len(ids))))
        h = torch.randn(1, rt.C)
        f = torch.randn(1, rt._fc.shape[1])

        def linears():
            for b in rt.blocks:
                b.qkv(h, rt._qkv)
                b.proj(h, rt._attn_out)
                b.fc(h, rt._fc)
                b.mproj(f, rt._attn_out)
        lin = best(linears)
        head = best(lambda: rt.head(h, rt._logits))
    return {"step_ms": step, "block_linears_ms": lin, "head_ms": head,
            "other_ms": max(0.0, step - lin - head), "note": "best-of-N per component; other = step - linears - head"}


class _Times:
    """A generate streamer that records when each chunk of tokens arrives."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def _worker_hf(spec: dict) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(spec["threads"])
    base = _rss_mb()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["variant"]]
    model = GPT2LMHeadModel.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    ids = _prompt(spec).unsqueeze(0)
    n = spec["new_tokens"]
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, min_new_tokens=n, max_new_tokens=n)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        dec, pre = [], []
        for _ in range(spec["repeats"]):
            s = _Times()
            t0 = time.perf_counter()
            model.generate(ids, streamer=s, **kw)
            # s.t[0]: the prompt echo, s.t[1]: first new token (end of prefill), s.t[-1]: last token
            pre.append(ids.shape[1] / (s.t[1] - t0))
            dec.append((len(s.t) - 2) / (s.t[-1] - s.t[1]))
    return {"decode_tok_s": max(dec), "prefill_tok_s": max(pre), "n_new_tokens": n,
            "baseline_rss_mb": base, "peak_rss_mb": _rss_mb()}


# Runs under the llama.cpp interpreter, which need not have ternlm (or torch) installed.
_LLAMA_WORKER = r'''
import json, resource, sys, time
import numpy as np
spec = json.loads(sys.argv[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import llama_cpp
base = rss()
llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                      n_ctx=max(512, spec["prompt_tokens"] + spec["new_tokens"] + 8), n_batch=512, verbose=False)
ids = spec["ids"]
def run(n_new):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (n_new - 1) / (t2 - t1)
run(4)
res = [run(spec["new_tokens"]) for _ in range(spec["repeats"])]
print(json.dumps({"prefill_tok_s": max(r[0] for r in res), "decode_tok_s": max(r[1] for r in res),
                  "n_new_tokens": spec["new_tokens"], "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
                  "baseline_rss_mb": base, "peak_rss_mb": rss()}))
'''


def _prompt(spec: dict):
    import torch

    g = torch.Generator().manual_seed(spec.get("seed", 0))
    return torch.randint(0, spec["vocab_size"], (spec["prompt_tokens"],), generator=g)


def _run_worker(kind: str, spec: dict, python: str | None = None, timeout: float = 1800) -> dict:
    if kind == "llama_cpp":
        cmd = [python, "-c", _LLAMA_WORKER, json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "ternlm.bench", "--worker", kind, "--spec", json.dumps(spec)]
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
    import platform

    import torch

    tmp = None
    if cfg.workdir:
        work = Path(cfg.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ternlm-bench-")
        work = Path(tmp.name)
    try:
        hc = _hf_config(cfg)
        log(f"model: GPT-2 n_layer={hc.n_layer} n_embd={hc.n_embd} vocab={hc.vocab_size}; "
            f"{cfg.prompt_tokens}-token prompt, {cfg.new_tokens} greedy tokens, {cfg.threads} threads")
        bw = copy_bandwidth_gbs()
        log(f"copy bandwidth: {bw:.1f} GB/s")
        files = prepare_files(cfg, work, log)
        base_spec = {"threads": cfg.threads, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                     "repeats": cfg.repeats, "vocab_size": hc.vocab_size, "seed": cfg.seed, "hf_dir": files["hf_dir"],
                     "gelu": cfg.gelu}
        rows: list[dict] = []
        skipped: list[dict] = []
        # (system, variant, worker kind, spec, interpreter, row extras as a function of the result)
        jobs: list[tuple] = []

        if "ternlm" in cfg.systems:
            for i, v in enumerate(cfg.ternlm_variants):
                act, fmt, head = _parse_variant(v)
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
                             lambda res, size=size, store=store, v=v: (size, bytes_per_token(hc, store, store),
                                                                       {"head": v})))
        if "llama_cpp" in cfg.systems:
            py, why = _llama_python(cfg)
            for v in cfg.llama_variants:
                reason = why or files.get(f"gguf_{v}_skip")
                if reason:
                    skipped.append({"system": "llama_cpp", "variant": v, "reason": reason})
                    log(f"  llama.cpp {v}: skipped ({reason})")
                    continue
                lin, head = (v.split("-") if "-" in v else (v, v))
                spec = {**base_spec, "variant": v, "gguf": files[f"gguf_{v}"], "ids": _prompt(base_spec).tolist()}
                jobs.append(("llama_cpp", v, "llama_cpp", spec, py,
                             lambda res, v=v, lin=lin, head=head: (
                                 files[f"gguf_{v}_bytes"], bytes_per_token(hc, lin, head),
                                 {"head": {"f16": "fp16", "q8_0": "int8"}[head], "gguf_tool": files.get(f"gguf_{v}_tool")})))

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
        _ratios(rows)
        return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": bw,
                "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "python": platform.python_version()},
                "files": {k: v for k, v in files.items() if k.endswith("_bytes") or k.endswith("_tool")},
                "rows": rows, "skipped": skipped}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _ratios(rows: list[dict]) -> None:
    def find(system, variant):
        return next((r for r in rows if r["system"] == system and r["variant"] == variant), None)

    hf32 = find("hf", "fp32")
    for r in rows:
        r["x_hf_fp32"] = r["decode_tok_s"] / hf32["decode_tok_s"] if hf32 else None
        peer = find("llama_cpp", _SAME_HEAD.get(r.get("head"), ""))
        r["x_llama_tq2_same_head"] = (r["decode_tok_s"] / peer["decode_tok_s"]
                                      if peer and r["system"] == "ternlm" else None)


def bench_command(cfg: BenchConfig) -> str:
    d = BenchConfig()
    args = []
    for f in fields(BenchConfig):
        v = getattr(cfg, f.name)
        if v == getattr(d, f.name) or f.name in ("overrides",):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, tuple):
            args += [flag, ",".join(v)]
        elif isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return " ".join(["ternlm bench", *map(shlex.quote, args)])


def format_table(res: dict) -> str:
    cols = [("system", "{}"), ("variant", "{}"), ("decode tok/s", "{:.1f}"), ("prefill tok/s", "{:.1f}"),
            ("x llama TQ2_0 same head", "{:.2f}"), ("x HF fp32", "{:.2f}"), ("file MB", "{:.1f}"),
            ("peak RSS MB", "{:.0f}"), ("MB/token", "{:.1f}"), ("GB/s", "{:.1f}"), ("% copy BW", "{:.0f}")]
    keys = ["system", "variant", "decode_tok_s", "prefill_tok_s", "x_llama_tq2_same_head", "x_hf_fp32", "file_bytes",
            "peak_rss_mb", "bytes_per_token", "achieved_gbs", "pct_of_copy_bw"]
    scale = {"file_bytes": 1e-6, "bytes_per_token": 1e-6}
    body = []
    for r in res["rows"]:
        cells = []
        for (_, fmt), k in zip(cols, keys):
            v = r.get(k)
            cells.append("-" if v is None else fmt.format(v * scale.get(k, 1) if isinstance(v, (int, float)) else v))
        body.append(cells)
    head = [c for c, _ in cols]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    for s in res["skipped"]:
        out.append(f"skipped {s['system']} {s['variant']}: {s['reason']}")
    for r in res["rows"]:
        if "profile" in r:
            p = r["profile"]
            out.append(f"decode profile ({r['system']} {r['variant']}): step {p['step_ms']:.2f} ms = block linears "
                       f"{p['block_linears_ms']:.2f} + LM head {p['head_ms']:.2f} + other {p['other_ms']:.2f} ms")
    out.append(f"copy bandwidth {res['copy_bandwidth_gbs']:.1f} GB/s; command: {res['command']}")
    return "\n".join(out)


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
        from ternlm.kernels import microbench

        print("\nkernel micro-benchmark (GPT-2 shapes, ternlm W2A8/W2A16 vs torch fp32 F.linear):")
        micro = microbench.run(threads=cfg.threads)
        print(microbench.format_table(micro))
        res["kernels"] = micro
    if cfg.json:
        from ternlm.fileio import atomic_write_text

        atomic_write_text(Path(cfg.json), json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {cfg.json}")
    return res


_HELP = {
    "model_config": "GPT-2 config (+ tokenizer) directory or hub id giving the model's shape",
    "prompt_tokens": "prompt length (default: 16)",
    "new_tokens": "greedy tokens decoded per run (default: 128)",
    "threads": "threads for every system (default: 2)",
    "repeats": "runs per system and round; the best is reported (default: 3)",
    "rounds": "round-robin passes over all systems, so load drift on a shared machine hits all alike (default: 1)",
    "systems": "comma-separated: ternlm,hf,llama_cpp",
    "ternlm_variants": f"comma-separated ACT-FORMAT-HEAD (default: {','.join(TERNLM_VARIANTS)})",
    "hf_variants": "comma-separated: fp32,bf16",
    "llama_variants": f"comma-separated: {','.join(LLAMA_VARIANTS)}",
    "gelu": "runtime GELU: tanh (fused) or model (HF's op for op)",
    "llama_python": "interpreter that imports llama_cpp (default: this one, else the benchmark venv)",
    "workdir": "keep the model files here (default: a temporary directory)",
    "json": "also write the results as JSON here",
    "profile": "per-component decode profile of the first ternlm variant",
    "seed": "random seed of the model weights and the prompt",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The BenchConfig fields as command-line flags (shared by ``ternlm bench`` and ``-m ternlm.bench``)."""
    for f in fields(BenchConfig):
        if f.name == "overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        h = _HELP.get(f.name)
        if f.type == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.type in ("int",):
            p.add_argument(flag, dest=f.name, type=int, help=h)
        else:
            p.add_argument(flag, dest=f.name, help=h)
    p.add_argument("--kernels", action="store_true",
                   help="also run the kernel micro-benchmark (GPT-2 shapes, batch 1 and 512, vs torch fp32)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ternlm.bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    if a.worker:
        fn = {"ternlm": _worker_ternlm, "hf": _worker_hf}[a.worker]
        print(json.dumps(fn(json.loads(a.spec))))
        return
    bench_main(a)


if __name__ == "__main__":
    main()
