"""Table and plot of the quality scoreboard from the JSON files `ternlm eval` wrote (scripts/scoreboard.sh).

    python scripts/scoreboard.py runs/scoreboard --plot docs/scoreboard.png --markdown runs/scoreboard/scoreboard.md

Bits per weight are counted from each file: the bytes of its tensors (GGUF tensor data; every tensor
of a ternlm checkpoint's model.safetensors: packed codes, scales, embeddings, norms) times 8, over the
model's parameter count (the baseline GGUF's tensor elements). Rows quantized in memory have no file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_quants import file_stats  # noqa: E402

from ternlm.fileio import save_json  # noqa: E402

TASK_ORDER = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada", "boolq")
LABELS = {
    "fp32": "SmolLM2-135M baseline (the shipped Q4_1 file, dequantized to fp32)",
    "int8_absmax": "int8 absmax, per row (in memory, W8A16)",
    "llm_int8": "LLM.int8() (in memory)",
    "absmean": "ternlm ternary absmean, per tensor (W1.58A8)",
    "ptbitnet": "ternlm pt-bitnet, groups of 64 (W1.58A8)",
    "ptbitnet-distill": "ternlm pt-bitnet + distillation (W1.58A8)",
    "ptbitnet-g128": "ternlm pt-bitnet, groups of 128 (W1.58A8)",
    "ptbitnet-g1536": "ternlm pt-bitnet, one scale per row (groups of 1536; W1.58A8)",
    "ptbitnet-g1536-base3": "ternlm pt-bitnet, one scale per row, base-3 1.6-bit codes (W1.58A8)",
    "ptbitnet-b3.0": "ternlm pt-bitnet g64, budget 3.0 bits: most sensitive linears int8 (W1.58A8)",
}


def safetensors_bytes(path: Path) -> int:
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


class MissingFile(Exception):
    pass


def file_of(res: dict) -> tuple[Path | None, dict | None]:
    """(file, its size stats) of an evaluated model, None for in-memory quantization. The stats are
    counted from the file when it is there, else taken from the row's JSON (`file_stats`, written the
    first time the file was counted), so a finished table does not need the model files."""
    if res.get("quant"):
        return None, None
    p = Path(res["model"])
    if p.suffix == ".gguf":
        if p.is_file():
            return p, file_stats(p)
    else:
        st = p / "model.safetensors"
        if st.is_file():
            return st, {"mb": sum(f.stat().st_size for f in p.iterdir() if f.is_file()) / 1e6,
                        "tensor_bytes": safetensors_bytes(st)}
    if "file_stats" in res:
        return p, dict(res["file_stats"])
    raise MissingFile(f"{p} is gone and its row has no file_stats")


def rows(out: Path) -> list[dict]:
    found = []
    base_n = None
    for f in sorted((out / "eval").glob("*.json")):
        if f.name.endswith(".full.json"):
            continue
        res = json.loads(f.read_text())
        name = f.stem
        try:
            path, stats = file_of(res)
        except MissingFile as e:
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
        if stats and res.get("file_stats") != stats:  # remember the counts beside the scores
            res["file_stats"] = stats
            save_json(res, f)
        if name == "fp32" and stats:
            base_n = stats["n_weights"]
        full = f.with_name(name + ".full.json")
        found.append({"name": name, "res": res, "path": path, "stats": stats,
                      "full": json.loads(full.read_text()) if full.is_file() else None})
    for r in found:
        s = r["stats"]
        if s and "bpw" not in s and base_n:
            s["bpw"] = 8 * s["tensor_bytes"] / base_n
    return found


def label(name: str, stats: dict | None) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith("llama-"):
        t = name[len("llama-"):].replace("-imatrix", " + imatrix")
        return f"llama.cpp {t}"
    return name


def markdown(found: list[dict]) -> str:
    head = ["model", "file MB", "bits/weight", "WikiText-2 ppl"] + list(TASK_ORDER) + ["average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(found, key=lambda r: -(r["stats"] or {}).get("bpw", 99)):
        z = r["res"]["zeroshot"]
        s = r["stats"]
        twin = r["res"].get("identical_to")
        name = label(r["name"], s) + (f" (byte-identical to {twin})" if twin else "")
        cells = [name, f"{s['mb']:.1f}" if s else "—", f"{s['bpw']:.2f}" if s else "—",
                 _ppl(r["res"]["perplexity"]["perplexity"])]
        for t in TASK_ORDER:
            tr = z["tasks"].get(t)
            cells.append(f"{100 * tr[tr['primary']]:.1f}" if tr else "—")
        cells.append(f"**{100 * z['average']:.1f}**")
        lines.append("| " + " | ".join(cells) + " |")
    first = found[0]["res"]["zeroshot"]
    n = {t: first["tasks"][t]["n_docs"] for t in TASK_ORDER if t in first["tasks"]}
    metrics = {t: first["tasks"][t]["primary"] for t in n}
    chance = sum(first["tasks"][t]["chance"] for t in n) / len(n)
    lines.append("")
    lines.append("Documents per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) + "; metrics: "
                 + ", ".join(f"{t} {m}" for t, m in metrics.items()) + f"; chance average {100 * chance:.1f}.")
    fulls = [r for r in found if r["full"]]
    if fulls:
        lines.append("")
        lines.append("Full splits:")
        lines.append("")
        lines.append("| model | " + " | ".join(TASK_ORDER) + " | average | seconds |")
        lines.append("|" + "---|" * (len(TASK_ORDER) + 3))
        for r in fulls:
            z = r["full"]["zeroshot"]
            cells = [label(r["name"], r["stats"])]
            for t in TASK_ORDER:
                tr = z["tasks"].get(t)
                cells.append(f"{100 * tr[tr['primary']]:.1f}" if tr else "—")
            cells += [f"**{100 * z['average']:.1f}**", f"{z['seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ppl(p: float) -> str:
    if not math.isfinite(p):
        return "inf"
    return f"{p:.1f}" if p < 1e4 else f"{p:.2e}"


def plot(found: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 5))
    first = found[0]["res"]["zeroshot"]
    chance = sum(t["chance"] for t in first["tasks"].values()) / len(first["tasks"])
    for r in found:
        s = r["stats"]
        if not s:
            continue
        x = s["bpw"]
        ternlm = not r["name"].startswith("llama-")
        kw = dict(marker="o" if ternlm else "s", color="tab:red" if ternlm else "tab:blue", s=40)
        y = 100 * r["res"]["zeroshot"]["average"]
        a0.scatter(x, y, **kw)
        a0.annotate(label(r["name"], s).replace("ternlm ", "").replace("llama.cpp ", ""), (x, y), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
        p = r["res"]["perplexity"]["perplexity"]
        a1.scatter(x, min(p, 1e7), **kw)
        a1.annotate(label(r["name"], s).replace("ternlm ", "").replace("llama.cpp ", ""), (x, min(p, 1e7)),
                    fontsize=7, xytext=(4, 2), textcoords="offset points")
    a0.axhline(100 * chance, ls="--", color="grey", lw=1)
    a0.text(a0.get_xlim()[1], 100 * chance, " chance", va="center", fontsize=8, color="grey")
    a0.set_xlabel("bits per weight (counted from the file)")
    a0.set_ylabel("zero-shot average, % (7 tasks)")
    a0.set_title("Zero-shot quality against size (red: ternlm, blue: llama.cpp)")
    a1.set_yscale("log")
    a1.set_xlabel("bits per weight (counted from the file)")
    a1.set_ylabel("WikiText-2 test perplexity (10 x 512 tokens)")
    a1.set_title("Perplexity against size")
    for a in (a0, a1):
        a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the scoreboard folder (scripts/scoreboard.sh's OUT)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    found = rows(Path(a.out))
    if not found:
        sys.exit(f"no results in {a.out}/eval")
    md = markdown(found)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)
    if a.plot:
        plot(found, Path(a.plot))


if __name__ == "__main__":
    main()
