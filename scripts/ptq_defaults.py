"""pt-bitnet settings measured on SmolLM2-135M, each run the user's path (`ternlm quantize`, then
`ternlm eval`) in its own process: calibration size, reconstruction steps, seeds, group size, budget.

    python scripts/ptq_defaults.py --out runs/ptq-defaults --runs c8k_s32,c32k_s32,c8k_s128
    python scripts/ptq_defaults.py --out runs/ptq-defaults --table      # the table of what is there

Calibration text: the first 85% of WikiText-2 valid's lines; the choice of settings is made on
perplexity over the other 15% ("selection", never calibrated on); WikiText-2 test perplexity is
reported beside it and chooses nothing. Zero-shot tasks (--zeroshot-limit N) are reported too.
Resumable: a run whose result file exists is not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TERNLM_DATA_DIR", REPO.parent / "shared" / "data"))

# name -> ternlm quantize flags (beyond --method pt-bitnet --calib CALIB)
RUNS = {
    "c8k_s32": "--calib-tokens 8192 --reconstruct-steps 32 --group-size 64",
    "c8k_s32_seed1": "--calib-tokens 8192 --reconstruct-steps 32 --group-size 64 --seed 1",
    "c8k_s32_seed2": "--calib-tokens 8192 --reconstruct-steps 32 --group-size 64 --seed 2",
    "c32k_s32": "--calib-tokens 32768 --reconstruct-steps 32 --group-size 64",
    "c128k_s32": "--calib-tokens 131072 --reconstruct-steps 32 --group-size 64",
    "c8k_s128": "--calib-tokens 8192 --reconstruct-steps 128 --group-size 64",
    "c8k_s512": "--calib-tokens 8192 --reconstruct-steps 512 --group-size 64",
    "c32k_s128": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 64",
    "c32k_s128_seed1": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 64 --seed 1",
    # bits per weight: group size and format (the Pareto curve), budgets of int8 layers
    "g1536_base3": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 1536 --format base3",
    "g1536": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 1536",
    "g128": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 128",
    "g64_b3.0": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 64 --budget-bpw 3.0",
    "g64_b3.5": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 64 --budget-bpw 3.5",
    "g64_b4.0": "--calib-tokens 32768 --reconstruct-steps 128 --group-size 64 --budget-bpw 4.0",
}


def split_valid(out: Path) -> tuple[Path, Path]:
    lines = (DATA / "wikitext-2" / "tokens.valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.85)
    calib, sel = out / "wiki-valid-calib.txt", out / "wiki-valid-select.txt"
    if not calib.is_file():
        calib.write_text("".join(lines[:cut]), encoding="utf-8")
        sel.write_text("".join(lines[cut:]), encoding="utf-8")
    return calib, sel


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def one(name: str, out: Path, calib: Path, sel: Path, zeroshot: int) -> dict:
    res_file = out / f"{name}.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    ck = out / "models" / name
    smol = DATA / "smollm2-135m"
    wall = None
    if not ck.is_dir():
        wall = run(["ternlm", "quantize", str(smol), "-o", str(ck), "--method", "pt-bitnet", "--calib", str(calib),
                    "--quiet", *RUNS[name].split()])
    res = {"name": name, "flags": RUNS[name], "quantize_seconds": wall}
    for key, text, windows in (("select", sel, 20), ("test", DATA / "wikitext-2" / "wiki.test.raw", 10)):
        j = out / f"{name}.{key}.eval.json"
        args = ["ternlm", "eval", str(ck), "--text", str(text), "--max-windows", str(windows), "--json", str(j),
                "--quiet"]
        if key == "test" and zeroshot:
            args += ["--tasks", "all", "--tasks-dir", str(DATA / "zeroshot"), "--limit", str(zeroshot)]
        run(args)
        e = json.loads(j.read_text())
        res[f"ppl_{key}"] = e["perplexity"]["perplexity"]
        if "zeroshot" in e:
            res["zeroshot_average"] = e["zeroshot"]["average"]
            res["zeroshot"] = {t: r[r["primary"]] for t, r in e["zeroshot"]["tasks"].items()}
    st = ck / "model.safetensors"
    res["file_mb"] = st.stat().st_size / 1e6
    log = ck / "ternlm_ptq.json"
    if log.is_file():
        p = json.loads(log.read_text())
        res["ptq_wall_s"] = p.get("wall_s")
        res["linear_bpw_fp32_scales"] = p["bits_per_weight"]["fp32_scales"]
    b = ck / "ternlm_budget.json"
    if b.is_file():
        bp = json.loads(b.read_text())
        res["budget_bpw"], res["ternary_share"], res["int8_layers"] = bp["bpw"], bp["ternary_share"], len(bp["int8"])
    res_file.write_text(json.dumps(res, indent=2))
    return res


def table(out: Path) -> str:
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json")) if f.name.count(".") == 1
            and f.stem in RUNS]
    lines = ["| run | flags | quantize s | selection ppl | test ppl | zero-shot avg | file MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        z = f"{100 * r['zeroshot_average']:.1f}" if "zeroshot_average" in r else "—"
        q = f"{r['quantize_seconds']:.0f}" if r.get("quantize_seconds") else "—"
        lines.append(f"| {r['name']} | `{r['flags']}` | {q} | {r['ppl_select']:.1f} | {r['ppl_test']:.1f} | {z} | "
                     f"{r['file_mb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ptq-defaults")
    ap.add_argument("--runs", default="")
    ap.add_argument("--zeroshot-limit", type=int, default=0)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    calib, sel = split_valid(out)
    for name in [r for r in a.runs.split(",") if r]:
        if name not in RUNS:
            sys.exit(f"unknown run {name}; known: {', '.join(RUNS)}")
        r = one(name, out, calib, sel, a.zeroshot_limit)
        print(f"{name}: selection {r['ppl_select']:.1f}, test {r['ppl_test']:.1f}"
              + (f", zero-shot {r['zeroshot_average']:.4f}" if "zeroshot_average" in r else ""), flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
