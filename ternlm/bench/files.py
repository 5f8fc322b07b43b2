"""The benchmark's model files: a GPT-2-shaped model with ternary-valued block weights, saved as a
HF directory, as ternlm checkpoints per packed format, and as GGUF files for llama.cpp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ternlm.bench.config import DEFAULT_CONVERT_SCRIPT, BenchConfig, parse_variant
from ternlm.errors import TernlmError


def hf_config(cfg: BenchConfig):
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
    model = GPT2LMHeadModel(hf_config(cfg)).eval()
    with torch.no_grad():
        for name in block_linear_layers(model):
            w = model.get_submodule(name).weight
            w.copy_(fake_quantize_ternary(w, TernaryConfig()))
    return model


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf"))


def prepare_files(cfg: BenchConfig, work: Path, log) -> dict:
    """HF dir (+ tokenizer), ternlm checkpoints per format, GGUF files; returns their paths and sizes."""
    from transformers import AutoTokenizer

    files: dict = {"hf_dir": str(work / "hf")}
    model = make_model(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model_config)
    model.save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    files["hf_bytes"] = dir_bytes(work / "hf")

    fmts = sorted({parse_variant(v)[1] for v in cfg.ternlm_variants}) if "ternlm" in cfg.systems else []
    need_gguf = "llama_cpp" in cfg.systems and any(v.startswith("tq2_0") for v in cfg.llama_variants)
    if need_gguf and "2bit" not in fmts:
        fmts.append("2bit")
    from ternlm.checkpoint import save_pretrained
    from ternlm.config import TernaryConfig
    from ternlm.conversion import convert

    for fmt in fmts:
        m = convert(make_model(cfg), TernaryConfig(act_bits=8), fmt=fmt)
        d = save_pretrained(m, tok, work / f"ternlm-{fmt}", float_dtype="fp16")
        files[f"ternlm_{fmt}_dir"] = str(d)
        files[f"ternlm_{fmt}_bytes"] = dir_bytes(Path(d))

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
