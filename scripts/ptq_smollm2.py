"""Ternary PTQ of SmolLM2-135M-Instruct: pt-bitnet, its ablations and naive absmean baselines.

Each configuration runs in its own subprocess (fresh model, honest peak RSS); the parent prints a
markdown table and writes JSON. Perplexity: WikiText-2 test, first N non-overlapping windows of 512
tokens. Calibration: WikiText-2 valid (never the test text).

    PYTHONPATH=. python scripts/ptq_smollm2.py --configs baseline,full,no_transform --json runs/ptq.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TERNLM_DATA_DIR", REPO.parent / "shared" / "data"))

# name -> (kind, PTBitNetConfig overrides or naive granularity)
CONFIGS = {
    "baseline": ("fp", {}),
    "naive_tensor": ("naive", {"granularity": "per_tensor"}),
    "naive_row": ("naive", {"granularity": "per_channel"}),
    "naive_g128": ("naive", {"granularity": "per_group", "group_size": 128}),
    "naive_g64": ("naive", {"granularity": "per_group", "group_size": 64}),
    "full": ("ptq", {}),
    "no_transform": ("ptq", {"transform": False}),
    "no_error_feedback": ("ptq", {"error_feedback": False}),
    "no_reconstruct": ("ptq", {"reconstruct": False}),
    "full_g64": ("ptq", {"group_size": 64}),
    "full_g256": ("ptq", {"group_size": 256}),
    "full_a8": ("ptq", {"act_bits": 8}),
}
DEFAULT = "baseline,naive_tensor,naive_row,naive_g128,full,no_transform,no_error_feedback,no_reconstruct,full_g64,full_g256"


def _naive(model, granularity: str, group_size: int = 128) -> dict:
    """BitNet absmean fake quantization of the block linears, written back into the float layers."""
    import torch

    from ternlm.config import QuantConfig, TernaryConfig
    from ternlm.nn.surgery import select_targets
    from ternlm.ptq.arch import get_weight, set_weight
    from ternlm.ptq.rounding import absmean_grouped, expand_groups, n_groups
    from ternlm.quant.ternary import fake_quantize_ternary

    n_w = n_s = 0
    for t in select_targets(model, QuantConfig()):
        m = model.get_submodule(t)
        w = get_weight(m)
        if granularity == "per_group":
            codes, s = absmean_grouped(w, group_size)
            wq = codes * expand_groups(s, w.shape[1], group_size)
            n_s += w.shape[0] * n_groups(w.shape[1], group_size)
        else:
            wq = fake_quantize_ternary(w, TernaryConfig(granularity=granularity))
            n_s += w.shape[0] if granularity == "per_channel" else 1
        n_w += w.numel()
        with torch.no_grad():
            set_weight(m, wq)
    return {"fp32_scales": (2 * n_w + 32 * n_s) / n_w, "fp16_scales": (2 * n_w + 16 * n_s) / n_w}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from ternlm.eval.cost import peak_rss_mb
    from ternlm.eval.perplexity import perplexity
    from ternlm.models.loading import load_causal_lm, load_tokenizer
    from ternlm.ptq import PTBitNetConfig, calibration_ids, ptbitnet_quantize

    kind, over = CONFIGS[args.worker]
    model_dir = str(args.model_dir)
    model = load_causal_lm(model_dir).eval()  # dequantized, fp32
    tok = load_tokenizer(model_dir)
    out = {"config": args.worker, "kind": kind}
    t0 = time.perf_counter()
    if kind == "naive":
        out["bits_per_weight"] = _naive(model, **over)
    elif kind == "ptq":
        cfg = PTBitNetConfig(calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                             reconstruct_steps=args.steps, lr=args.lr, seed=args.seed,
                             **{k: v for k, v in over.items()})
        calib_text = (DATA / "wikitext-2" / "tokens.valid.txt").read_text(encoding="utf-8")
        ids = calibration_ids(tok, calib_text, cfg.calib_tokens, cfg.seq_len, cfg.seed)
        # the packed layer takes per-group scales only when the groups divide every layer
        from ternlm.config import QuantConfig
        from ternlm.nn.surgery import select_targets
        from ternlm.ptq.arch import get_weight

        dims = {get_weight(model.get_submodule(t)).shape[1] for t in select_targets(model, QuantConfig())}
        pack = all(d % cfg.group_size == 0 for d in dims)
        rec = ptbitnet_quantize(model, ids, cfg, progress=not args.quiet, pack=pack)
        out["bits_per_weight"] = rec["bits_per_weight"]
        out["packed"] = pack
        out["record"] = rec
    else:
        out["bits_per_weight"] = {"fp32_scales": 32.0, "fp16_scales": 32.0}
    out["quant_wall_s"] = time.perf_counter() - t0
    text = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    t1 = time.perf_counter()
    out["ppl"] = perplexity(model, tok, text, max_length=args.window, stride=args.window, max_windows=args.windows)
    out["eval_wall_s"] = time.perf_counter() - t1
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def table(rows: list[dict]) -> str:
    lines = ["| config | WikiText-2 ppl | bits/weight (fp32 scales) | bits/weight (fp16 scales) | packed | "
             "quantize wall s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bits_per_weight"]
        lines.append(f"| {r['config']} | {r['ppl']['perplexity']:.4g} | {b['fp32_scales']:.3f} | "
                     f"{b['fp16_scales']:.3f} | {r.get('packed', '-')} | {r['quant_wall_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT, help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--model-dir", type=Path, default=DATA / "smollm2-135m")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=32, help="reconstruction steps per block")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window (default: 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=REPO / "runs" / "ptq_smollm2.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.worker_out.write_text(json.dumps(worker(args)))
        return
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    rows = []
    passthrough = ["--model-dir", str(args.model_dir), "--calib-tokens", str(args.calib_tokens),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--lr", str(args.lr),
                   "--seed", str(args.seed), "--windows", str(args.windows), "--window", str(args.window), "--threads", str(args.threads)]
    if args.quiet:
        passthrough.append("--quiet")
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            res = Path(d) / "out.json"
            subprocess.run([sys.executable, __file__, "--worker", name, "--worker-out", str(res), *passthrough],
                           check=True)
            row = json.loads(res.read_text())
        rows.append(row)
        print(f"{name}: ppl {row['ppl']['perplexity']:.4g}, quantize {row['quant_wall_s']:.0f} s", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
