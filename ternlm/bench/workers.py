"""Benchmark workers: each runs in a fresh process (``python -m ternlm.bench.workers KIND SPEC``), so its
peak RSS is its own, and prints one JSON line. The llama.cpp worker is ``llama_worker.py`` beside this
file, run by path under the peer's interpreter."""

from __future__ import annotations

import json
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
    seen, param_bytes = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            param_bytes += t.numel() * t.element_size()
    ids = prompt_ids(spec)
    n = spec["new_tokens"]
    hf_generate(model, ids, GenerateConfig(max_new_tokens=4), pad_token_id=0, ignore_eos=True)  # warm-up
    runs = [hf_generate(model, ids, GenerateConfig(max_new_tokens=n), pad_token_id=0, ignore_eos=True)
            for _ in range(spec["repeats"])]
    return {"decode_tok_s": max(r["decode_tok_s"] for r in runs),
            "prefill_tok_s": max(r["n_prompt_tokens"] / r["prefill_seconds"] for r in runs), "n_new_tokens": n,
            "param_bytes": param_bytes, "baseline_rss_mb": base, "peak_rss_mb": peak_rss_mb()}


def prompt_ids(spec: dict):
    import torch

    g = torch.Generator().manual_seed(spec.get("seed", 0))
    return torch.randint(0, spec["vocab_size"], (spec["prompt_tokens"],), generator=g)




WORKERS = {"ternlm": _worker_ternlm, "hf": _worker_hf}


def main(argv=None) -> None:
    kind, spec = (argv or sys.argv[1:])[:2]
    print(json.dumps(WORKERS[kind](json.loads(spec))))


if __name__ == "__main__":
    main()
