"""llama.cpp's own low-bit files of a model, made by llama.cpp's quantizer, for the quality scoreboard.

    python scripts/llama_quants.py ../shared/data/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf runs/scoreboard/llama \
        --types Q8_0,Q4_1,Q3_K_S,Q2_K,TQ2_0 --imatrix-types IQ2_XS --calib ../shared/data/wikitext-2/tokens.valid.txt

1. The source GGUF is dequantized into an f16 GGUF with gguf-py (every 2-D tensor to F16, 1-D
   tensors F32 as llama.cpp keeps them; metadata copied, file type set to MOSTLY_F16): the f16 file
   of the dequantized baseline, the same weights ``ternlm.load`` reads from the source.
2. ``llama-quantize`` (built by scripts/setup_llama_peer.sh from the llama-cpp-python sources) writes
   each type from the f16 file. Types that llama.cpp refuses without an importance matrix (IQ2_*,
   IQ1_*) get one from ``llama-imatrix`` over ``--calib`` (never the evaluation text).
Existing outputs are kept (delete a file to remake it). Prints one line per file: name, MB,
bits per weight counted from the file's tensors, and which ggml types its tensors ended up in
(rows that are not whole 256-weight blocks fall back to other types).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".venv-llama" / "tools"


def to_f16(src: Path, dst: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if key == "general.file_type":
            val = int(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_key_value(key, val, vtype, sub_type=sub)
    for t in reader.tensors:
        w = gguf.dequantize(t.data, t.tensor_type)
        w = w.reshape([int(x) for x in reversed(t.shape)])  # numpy order: (rows, cols)
        writer.add_tensor(t.name, w.astype(np.float16 if w.ndim >= 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)


def file_stats(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    n = sum(int(t.n_elements) for t in r.tensors)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    types = collections.Counter(t.tensor_type.name for t in r.tensors if len(t.shape) >= 2)
    return {"mb": path.stat().st_size / 1e6, "tensor_bytes": nbytes, "n_weights": n, "bpw": 8 * nbytes / n,
            "types": dict(types)}


def tool(name: str) -> str:
    p = TOOLS / name
    if not p.is_file():
        sys.exit(f"{p} not found: run scripts/setup_llama_peer.sh first")
    return str(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the model's GGUF file (dequantized into the f16 file)")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--types", default="Q8_0,Q4_1,Q3_K_S,Q2_K,TQ2_0,TQ1_0")
    ap.add_argument("--imatrix-types", default="", help="types quantized with an importance matrix (IQ2_XS, ...)")
    ap.add_argument("--calib", default=None, help="text for llama-imatrix (needed with --imatrix-types)")
    ap.add_argument("--imatrix-chunks", type=int, default=64, help="512-token chunks of --calib for the imatrix")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "f16.gguf"
    if not f16.exists():
        to_f16(Path(a.source), f16)
    made = {"F16": f16}
    for qt in [t for t in a.types.split(",") if t]:
        dst = out / f"{qt}.gguf"
        if not dst.exists():
            subprocess.run([tool("llama-quantize"), str(f16), str(dst) + ".tmp", qt, str(a.threads)], check=True,
                           stdout=subprocess.DEVNULL)
            os.replace(str(dst) + ".tmp", dst)
        made[qt] = dst
    imatrix_types = [t for t in a.imatrix_types.split(",") if t]
    if imatrix_types:
        if not a.calib:
            sys.exit("--imatrix-types needs --calib TEXT")
        im = out / "imatrix.gguf"
        if not im.exists():
            subprocess.run([tool("llama-imatrix"), "-m", str(f16), "-f", a.calib, "-o", str(im), "-c", "512",
                            "--chunks", str(a.imatrix_chunks), "-t", str(a.threads)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for qt in imatrix_types:
            dst = out / f"{qt}-imatrix.gguf"
            if not dst.exists():
                subprocess.run([tool("llama-quantize"), "--imatrix", str(im), str(f16), str(dst) + ".tmp", qt,
                                str(a.threads)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                os.replace(str(dst) + ".tmp", dst)
            made[f"{qt}+imatrix"] = dst
    for name, path in made.items():
        s = file_stats(path)
        types = ", ".join(f"{k} {v}" for k, v in sorted(s["types"].items(), key=lambda kv: -kv[1]))
        print(f"{name:<14} {path}  {s['mb']:7.1f} MB  {s['bpw']:.3f} bits/weight  2-D tensors: {types}")


if __name__ == "__main__":
    main()
