"""Benchmark workers: each runs in a fresh process (``python -m ternlm.bench.workers KIND SPEC``), so its
peak RSS is its own, and prints one JSON line. The llama.cpp worker is ``llama_worker.py`` beside this
file, run by path under the peer's interpreter; the ``llama_bench`` worker runs llama.cpp's own
``llama-bench`` tool and reads its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from ternlm.bench.config import parse_variant
from ternlm.eval.cost import peak_rss_mb


def _load_model(spec: dict):
    """--model mode: the model as ``ternlm.load`` gives it (float linears widened to fp32 for HF's CPU path)."""
    from ternlm import load

    model, _ = load(spec["model_dir"])
    return model.eval()


def _engine_from_files(directory, rc):
    """The engine read straight from a ternlm checkpoint (no HF model; what ``ternlm generate`` runs),
    or None when the directory is not one the direct reader covers."""
    from ternlm.errors import TernlmError
    from ternlm.models.loading import source_kind
    from ternlm.runtime.engine import DecodeEngine

    try:
        return DecodeEngine.from_checkpoint(directory, rc) if source_kind(directory) == "ternlm" else None
    except TernlmError:
        return None


def _worker_ternlm(spec: dict) -> dict:
    import torch

    from ternlm.kernels import get_level, set_num_threads
    from ternlm.runtime.engine import DecodeEngine, RuntimeConfig

    torch.set_num_threads(spec["threads"])
    set_num_threads(spec["threads"])
    base = peak_rss_mb()
    if spec.get("model_dir"):  # the checkpoint decides the linears; the row's variant is the head
        head, src = spec["head"], spec["model_dir"]
    elif spec.get("ckpt_dir") and parse_variant(spec["variant"])[0] == 8:
        head, src = parse_variant(spec["variant"])[2], spec["ckpt_dir"]
    else:
        head, src = parse_variant(spec["variant"])[2], None
    rc = RuntimeConfig(head=head, gelu=spec["gelu"], max_seq_len=spec["prompt_tokens"] + spec["new_tokens"])
    rt = _engine_from_files(src, rc) if src else None
    if rt is None:
        if spec.get("model_dir"):
            model = _load_model(spec)
        else:
            from transformers import GPT2LMHeadModel

            from ternlm.config import TernaryConfig
            from ternlm.conversion import convert

            act, fmt, head = parse_variant(spec["variant"])
            model = convert(GPT2LMHeadModel.from_pretrained(spec["hf_dir"]).eval(), TernaryConfig(act_bits=act),
                            fmt=fmt)
        rt = DecodeEngine(model, rc)
        del model  # the runtime holds what it needs
    ids = prompt_ids(spec)
    rt.generate(ids, 4)  # warm-up: thread pool, allocator, first-touch of every weight page
    runs = [rt.generate(ids, spec["new_tokens"]) for _ in range(spec["repeats"])]
    out = {"decode_tok_s": max(r["decode_tok_s"] for r in runs), "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
           "n_new_tokens": runs[0]["n_new_tokens"], "weight_bytes": rt.weight_bytes(), "kernel_level": get_level(),
           "baseline_rss_mb": base, "peak_rss_mb": peak_rss_mb()}
    if spec.get("profile"):
        out["profile"] = rt.profile(ids)
    return out


def model_bytes(model) -> tuple[int, int]:
    """(bytes of an HF model's parameters and buffers, shared tensors once; of those, the bytes a decode
    step reads): one row of each embedding table, unless the table is also the LM head."""
    import torch

    seen, param_bytes = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            param_bytes += t.numel() * t.element_size()
    head = model.get_output_embeddings()
    head_ptr = head.weight.data_ptr() if head is not None else None
    decode_bytes = param_bytes
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() != head_ptr:
            w = m.weight
            decode_bytes -= (w.shape[0] - 1) * w[0].numel() * w.element_size()
    return param_bytes, decode_bytes


def _worker_hf(spec: dict) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    from ternlm.generate import GenerateConfig, hf_generate

    torch.set_num_threads(spec["threads"])
    base = peak_rss_mb()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["variant"]]
    if spec.get("model_dir"):
        model = _load_model(spec)
    else:
        model = GPT2LMHeadModel.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    param_bytes, decode_bytes = model_bytes(model)
    ids = prompt_ids(spec)
    n = spec["new_tokens"]
    hf_generate(model, ids, GenerateConfig(max_new_tokens=4), pad_token_id=0, ignore_eos=True)  # warm-up
    runs = [hf_generate(model, ids, GenerateConfig(max_new_tokens=n), pad_token_id=0, ignore_eos=True)
            for _ in range(spec["repeats"])]
    return {"decode_tok_s": max(r["decode_tok_s"] for r in runs),
            "prefill_tok_s": max(r["n_prompt_tokens"] / r["prefill_seconds"] for r in runs), "n_new_tokens": n,
            "param_bytes": param_bytes, "decode_bytes": decode_bytes, "baseline_rss_mb": base,
            "peak_rss_mb": peak_rss_mb()}


def parse_llama_bench(text: str) -> dict:
    """Prefill (pp) and decode (tg) tokens/s from ``llama-bench -o json`` output: the best sample of each,
    as the other rows report the best of their repeats, with llama-bench's mean beside it."""
    from ternlm.errors import TernlmError

    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise TernlmError(f"llama-bench printed no JSON ({e})") from None
    out: dict = {}
    for t in tests if isinstance(tests, list) else []:
        key = "decode" if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0 else \
            "prefill" if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0 else None
        if key is None:
            continue
        out[f"{key}_tok_s"] = max(t.get("samples_ts") or [t["avg_ts"]])
        out[f"{key}_mean_tok_s"] = t["avg_ts"]
        out["n_new_tokens" if key == "decode" else "n_prompt_tokens"] = t["n_gen" if key == "decode" else "n_prompt"]
        out["llama_bench"] = {k: t.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                    "model_type", "n_threads", "repack", "flash_attn")}
    if "decode_tok_s" not in out or "prefill_tok_s" not in out:
        raise TernlmError("llama-bench JSON has no prompt-only (pp) and generation-only (tg) test")
    return out


def _worker_llama_bench(spec: dict) -> dict:
    """``llama-bench -p P -n N -t T -r R -o json`` on the spec's GGUF. The tool is this process's only
    child, so the children's peak RSS is the tool's. Its CPU extra buffer types (weights repacked for
    AMX and similar) are on by default; a run killed by a signal is retried once with ``--repack 0``."""
    import resource

    from ternlm.errors import TernlmError

    cmd = [spec["llama_bench"], "-m", spec["gguf"], "-p", str(spec["prompt_tokens"]), "-n", str(spec["new_tokens"]),
           "-t", str(spec["threads"]), "-r", str(spec["repeats"]), "-ngl", "0", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    retried = r.returncode < 0
    if retried:
        r = subprocess.run(cmd + ["--repack", "0"], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-2:])
        raise TernlmError(f"llama-bench failed (rc {r.returncode}): {tail}")
    out = parse_llama_bench(r.stdout)
    out["llama_bench"]["retried_without_repack"] = retried
    out["llama_bench"]["command"] = " ".join(cmd[1:] + (["--repack", "0"] if retried else []))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return out


def prompt_ids(spec: dict):
    import torch

    g = torch.Generator().manual_seed(spec.get("seed", 0))
    return torch.randint(0, spec["vocab_size"], (spec["prompt_tokens"],), generator=g)




WORKERS = {"ternlm": _worker_ternlm, "hf": _worker_hf, "llama_bench": _worker_llama_bench}


def main(argv=None) -> None:
    kind, spec = (argv or sys.argv[1:])[:2]
    print(json.dumps(WORKERS[kind](json.loads(spec))))


if __name__ == "__main__":
    main()
