"""Distillation recipes compared on SmolLM2-135M, each the user's command (`ternlm distill`, then
`ternlm eval`) in its own process: objective (logits KL, temperature, per-block hidden-state MSE),
learning rate, data (WikiText-2 valid's calibration part, the teacher's own text).

    python scripts/distill_recipes.py --student runs/ptq-defaults/models/c8k_s32 --out runs/distill-recipes \\
        --runs kl,kl_hidden,kl_t2,kl_selfgen --steps 150

The student is a pt-bitnet checkpoint calibrated on the first 85% of WikiText-2 valid's lines
(scripts/ptq_defaults.py); training text is that same part; the recipe is chosen on perplexity over
the other 15% ("selection"), which no run trains or calibrates on. WikiText-2 test perplexity and
zero-shot accuracy (--zeroshot-limit) are reported beside it and choose nothing. Resumable: a run
whose result file exists is not redone, a killed distillation resumes.
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

RECIPES = {
    "kl": "--lr 1e-3",
    "kl_lr3e-4": "--lr 3e-4",
    "kl_hidden": "--lr 1e-3 --hidden-weight 1.0",
    "kl_t2": "--lr 1e-3 --temperature 2",
    "kl_selfgen": "--lr 1e-3 --self-generate {selfgen} --text-weights 0.5,0.5",
    "kl_hidden_selfgen": "--lr 1e-3 --hidden-weight 1.0 --self-generate {selfgen} --text-weights 0.5,0.5",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--out", default="runs/distill-recipes")
    ap.add_argument("--runs", default="kl,kl_hidden")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--selfgen", type=int, default=100_000, help="self-generated tokens for the *_selfgen recipes")
    ap.add_argument("--selfgen-dir", default="runs/selfgen-smollm2")
    ap.add_argument("--zeroshot-limit", type=int, default=0)
    ap.add_argument("--name-suffix", default="")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    split = Path(a.student).parent.parent  # ptq_defaults' folder holds the WikiText-2 valid split
    calib, sel = split / "wiki-valid-calib.txt", split / "wiki-valid-select.txt"
    if not calib.is_file():
        sys.exit(f"{calib} not found: make the student with scripts/ptq_defaults.py")
    smol = DATA / "smollm2-135m"
    for name in [r for r in a.runs.split(",") if r]:
        if name not in RECIPES:
            sys.exit(f"unknown recipe {name}; known: {', '.join(RECIPES)}")
        tag = f"{name}_{a.steps}{a.name_suffix}"
        res_file = out / f"{tag}.json"
        if res_file.is_file():
            print(f"{tag}: done", flush=True)
            continue
        model = out / "models" / tag
        flags = RECIPES[name].format(selfgen=a.selfgen).split()
        wall = None
        if not model.is_dir():
            state = out / "state" / tag
            resume = ["--resume"] if (state / "ckpt" / "state.json").is_file() else []
            t0 = time.perf_counter()
            subprocess.run(["ternlm", "distill", "--teacher", str(smol), "--student", a.student, "--text", str(calib),
                            "-o", str(model), "--state-dir", str(state), "--steps", str(a.steps), "--batch-size",
                            str(a.batch_size), "--block-size", str(a.block_size), "--warmup", "20", "--save-every",
                            "50", "--self-generate-dir", a.selfgen_dir, "--quiet", *flags, *resume], check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
        summary = json.loads((model / "distill.json").read_text())
        res = {"name": tag, "recipe": RECIPES[name], "steps": a.steps, "tokens": summary["tokens"],
               "train_seconds": summary["train_seconds"], "wall_seconds": wall, "data": summary.get("data")}
        for key, text, windows in (("select", sel, 20), ("test", DATA / "wikitext-2" / "wiki.test.raw", 10)):
            j = out / f"{tag}.{key}.eval.json"
            args = ["ternlm", "eval", str(model), "--text", str(text), "--max-windows", str(windows), "--json", str(j),
                    "--quiet"]
            if key == "test" and a.zeroshot_limit:
                args += ["--tasks", "all", "--tasks-dir", str(DATA / "zeroshot"), "--limit", str(a.zeroshot_limit)]
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
            e = json.loads(j.read_text())
            res[f"ppl_{key}"] = e["perplexity"]["perplexity"]
            if "zeroshot" in e:
                res["zeroshot_average"] = e["zeroshot"]["average"]
        res_file.write_text(json.dumps(res, indent=2))
        print(f"{tag}: selection {res['ppl_select']:.1f}, test {res['ppl_test']:.1f}, {res['train_seconds']:.0f} s",
              flush=True)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json")) if f.name.count(".") == 1]
    print("| run | recipe | tokens | train s | selection ppl | test ppl | zero-shot avg |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        z = f"{100 * r['zeroshot_average']:.1f}" if "zeroshot_average" in r else "—"
        print(f"| {r['name']} | `{r['recipe']}` | {r['tokens']:,} | {r['train_seconds']:.0f} | {r['ppl_select']:.1f} | "
              f"{r['ppl_test']:.1f} | {z} |")


if __name__ == "__main__":
    main()
