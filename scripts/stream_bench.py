"""Streaming quantization benchmark: peak RSS against file size, and bit-identity with the in-memory path.

    PYTHONPATH=. python scripts/stream_bench.py --work /tmp/ternlm-stream-bench
    PYTHONPATH=. python scripts/stream_bench.py --hidden 512 --layers 4 --inter 1408 --vocab 4096   # quick
    PYTHONPATH=. python scripts/stream_bench.py --method pt-bitnet --work /tmp/ternlm-stream-ptb \
        --hidden 1024 --layers 8 --inter 2816 --calib ../shared/data/wikitext-2/tokens.valid.txt

Makes a synthetic Llama-architecture model with random fp32 weights as sharded safetensors (one
shard per block, written tensor by tensor so the script itself never holds the model), then in
separate processes (each measured with ``ternlm.eval.cost.peak_rss_mb``, and against the resident
set right after ``import torch, ternlm`` in the same process: "over import" is what the job costs):

  stream   ternlm.quantization.quantize(..., stream=True)    block by block
  memory   ternlm.quantization.quantize(..., stream=False)   load everything, convert, save

and compares every output tensor byte for byte. ``--method pt-bitnet`` (calibrated, one block in
memory) copies a tokenizer (``--tokenizer``, default the GPT-2 one in ../shared/data) beside the
weights and widens the vocabulary to hold it. Prints a table and writes ``stream_bench.json``.
Also prints the size plan of GPT-OSS-20B from its published config (``--gpt-oss-config``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch, ternlm
from ternlm.eval.cost import current_rss_mb, peak_rss_mb
base = current_rss_mb()
from ternlm.quantization import QuantizeConfig, quantize
src, out, stream, cfg = sys.argv[1], sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
t = time.perf_counter()
quantize(src, out, QuantizeConfig(**cfg), stream=stream, progress=sys.argv[5] == "1")
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": base}))
"""


def make_model(d: Path, hidden: int, layers: int, inter: int, vocab: int, seed: int = 0) -> int:
    """A random fp32 Llama written one block per shard; returns the weights' size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=False, dtype="float32")
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    units = [{"model.embed_tokens.weight": rnd(vocab, hidden)}]
    n = layers + 2
    weight_map, total = {}, 0

    def write(i, tensors):
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    write(0, units[0])
    for i in range(layers):
        p = f"model.layers.{i}."
        write(i + 1, {p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(hidden, hidden),
                      p + "self_attn.v_proj.weight": rnd(hidden, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
                      p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
                      p + "mlp.down_proj.weight": rnd(hidden, inter),
                      p + "input_layernorm.weight": torch.ones(hidden),
                      p + "post_attention_layernorm.weight": torch.ones(hidden)})
    write(n - 1, {"model.norm.weight": torch.ones(hidden), "lm_head.weight": rnd(vocab, hidden)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=2))
    return total


def run_child(src: Path, out: Path, stream: bool, cfg: dict, progress: bool = True) -> dict:
    import os
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), "1" if stream else "0",
                        json.dumps(cfg), "1" if progress else "0"], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"quantize ({'stream' if stream else 'memory'}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> tuple[bool, int]:
    """Every tensor of two ternlm checkpoints equal byte for byte (read one at a time)."""
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False, 0
    for k in ia:
        with safe_open(str(ia[k]), framework="pt") as ha, safe_open(str(ib[k]), framework="pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not x.reshape(-1).view(-1).numpy().tobytes() == \
                    y.reshape(-1).numpy().tobytes():
                return False, len(ia)
    return True, len(ia)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/ternlm-stream-bench")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--method", default="absmean", choices=("absmean", "pt-bitnet"))
    ap.add_argument("--calib", default=str(REPO.parent / "shared" / "data" / "wikitext-2" / "tokens.valid.txt"),
                    help="calibration text (pt-bitnet)")
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "gpt2-tokenizer"),
                    help="tokenizer copied beside the synthetic weights (pt-bitnet)")
    ap.add_argument("--skip-memory", action="store_true", help="only the streaming run (no identity check)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars in the runs (as `ternlm quantize --quiet`)")
    ap.add_argument("--gpt-oss-config", default=str(REPO / "tests" / "streaming" / "gpt_oss_20b_config.json"))
    ap.add_argument("--json", default=None, help="where to write the results (default: WORK/stream_bench.json)")
    a = ap.parse_args()

    work = Path(a.work)
    src = work / "src"
    t = time.perf_counter()
    cfg = {} if a.method == "absmean" else {"method": "pt-bitnet", "calib": a.calib}
    if not (src / "model.safetensors.index.json").is_file():
        vocab = a.vocab
        if a.method == "pt-bitnet":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(a.tokenizer)
            vocab = max(vocab, len(tok))
            tok.save_pretrained(src)
        size = make_model(src, a.hidden, a.layers, a.inter, vocab)
    else:
        size = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"synthetic Llama: {size / 2**30:.2f} GiB fp32 in {src} (made in {time.perf_counter() - t:.0f} s)")

    from ternlm.quantization import plan

    from ternlm.quantization import QuantizeConfig

    pl = plan(src, QuantizeConfig(**cfg))
    print(pl.table())
    res = {"file_bytes": size, "method": a.method, "plan_peak_ram": pl.peak_ram,
           "shape": dict(hidden=a.hidden, layers=a.layers, inter=a.inter,
                         vocab=json.loads((src / "config.json").read_text())["vocab_size"])}
    res["stream"] = run_child(src, work / "stream", True, cfg, not a.quiet)
    if not a.skip_memory:
        res["memory"] = run_child(src, work / "memory", False, cfg, not a.quiet)
        res["identical"], res["tensors"] = identical(work / "stream", work / "memory")
    rows = [("path", "seconds", "peak RSS MiB", "after import MiB", "over import MiB", "over import / file")]
    for k in ("stream", "memory"):
        if k in res:
            over = res[k]["peak_rss_mb"] - res[k]["import_rss_mb"]
            res[k]["over_import_mb"] = over
            rows.append((k, f"{res[k]['seconds']:.1f}", f"{res[k]['peak_rss_mb']:.0f}",
                         f"{res[k]['import_rss_mb']:.0f}", f"{over:.0f}", f"{over * 2**20 / size:.1%}"))
    for r in rows:
        print(f"{r[0]:<8} {r[1]:>8} {r[2]:>13} {r[3]:>17} {r[4]:>16} {r[5]:>19}")
    if "identical" in res:
        print(f"stream vs memory: {res['tensors']} tensors, {'identical bit for bit' if res['identical'] else 'DIFFERENT'}")
    if Path(a.gpt_oss_config).is_file():
        pl = plan(a.gpt_oss_config)
        print("\nGPT-OSS-20B (published config; no weights read):\n" + pl.table())
        res["gpt_oss_20b_plan"] = pl.to_dict()
    out = Path(a.json) if a.json else work / "stream_bench.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if res.get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
