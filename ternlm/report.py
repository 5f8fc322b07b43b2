"""Report writers: report.json, report.md and the PNG plots of a pipeline run."""

from __future__ import annotations

from pathlib import Path

import torch

METRICS = ("accuracy", "precision", "recall", "f1")


def write_report(report: dict, out: Path, weights: dict, layer: str) -> None:
    from ternlm.fileio import atomic_write_text
    from ternlm.fileio import save_json

    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_all(report, out, weights, layer)
    save_json(report, out / "report.json")
    atomic_write_text(out / "report.md", render_markdown(report))


def _fmt(v, nd=4):
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _mb(b):
    return f"{b / 1e6:.2f} MB"


def render_markdown(r: dict) -> str:
    cfg, var = r["config"], r["variants"]
    L = ["# ternlm pipeline report", "",
         f"Model: `{cfg['model']}` ({r['model']['architecture']}, {r['model']['n_params']:,} parameters"
         f"{', random init' if cfg['random_init'] else ''}); {len(r['model']['quantized_layers'])} linear layers "
         f"quantized. Data: `{r['data']['source']}` — {r['data']['n_messages']} messages, "
         f"{r['data']['n_spam']} spam, {r['data']['n_malformed']} malformed rows skipped, "
         f"{r['data'].get('n_duplicates_dropped', 0)} duplicate messages dropped before splitting; "
         f"train {r['data']['n_train']} / validation {r['data'].get('n_val', 0)} / test {r['data']['n_test']} "
         f"({r['data'].get('train_test_overlap', '?')} test messages also in training).", "",
         "## Spam classification (test split, spam = positive class)", "",
         "Recipe choices are made on the validation split (its F1 in the last column); the test split is only "
         "reported. Numerics: the weights and activations each variant ran with.", "",
         "| variant | numerics | accuracy | precision | recall | F1 | ROC-AUC | ms/msg (batch 1) | ms/msg (batch 32) "
         "| validation F1 |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in var.items():
        c = v.get("cost", {})
        L.append(f"| {name} | {v.get('numerics', '—')} | {_fmt(v['accuracy'])} | {_fmt(v['precision'])} | "
                 f"{_fmt(v['recall'])} | {_fmt(v['f1'])} | {_fmt(v.get('roc_auc'))} | "
                 f"{_fmt(c.get('latency_batch1', {}).get('ms_per_message'), 2)} | "
                 f"{_fmt(c.get('latency_batch32', {}).get('ms_per_message'), 2)} | "
                 f"{_fmt(v.get('val', {}).get('f1'))} |")
    sel = r.get("qat_selection")
    if sel:
        tried = ", ".join(f"{t['recipe']} {_fmt(t['val'].get('f1'))}" for t in sel["tried"])
        L += ["", f"QAT recipe chosen on the {sel['on']} split: **{sel['chosen']}** (validation F1 per recipe: "
                  f"{tried})."]
    q = r.get("qat_seeds")
    if q and q.get("init"):
        start = {"ptbitnet": "the pt-bitnet classifier (ternary_ptbitnet; learned scales from its calibrated ones)",
                 "absmean": "absmean ternarization of the fp32 classifier"}.get(q["init"], q["init"])
        L += ["", f"ternary_qat starts from {start} and fine-tunes {cfg['qat_epochs']:g} epoch(s) at lr "
                  f"{q.get('lr', cfg['qat_lr']):g} with the straight-through estimator."]
    if q and len(q["seeds"]) > 1:
        L += ["", f"QAT over seeds {q['seeds']}: F1 = {q['f1_mean']:.4f} ± {q['f1_std']:.4f} "
                  f"(per seed: {', '.join(f'{x:.4f}' for x in q['f1'])})."]
    if "llm_int8" in var and "llm_int8_backend" in var["llm_int8"]:
        L += ["", f"LLM.int8 ran on: {var['llm_int8']['llm_int8_backend']}."]
    for name in ("ternary_ptq", "ternary_ptbitnet", "ternary_qat"):
        vv = var.get(name, {}).get("verify")
        if vv:
            L += ["", f"Verify {name}: {vv['n_layers']} layers, {100 * vv['ternary_share']:.2f}% of weights in "
                      f"{{-1,0,+1}}·scale, {100 * vv['zeros_share']:.2f}% zeros, {vv['bits_per_weight']:.3f} bits/weight "
                      f"({vv['storage_bits_per_weight']:.3f} as 2-bit storage) — {'OK' if vv['ok'] else 'NOT TERNARY'}."]
    ppl = r.get("perplexity", {})
    if ppl:
        zs = r.get("zeroshot", {})
        tasks = list(next(iter(zs.values()))["tasks"]) if zs else []
        head = "| variant | perplexity | tokens scored |" + ("".join(f" {t} |" for t in tasks) + " zero-shot average |"
                                                              if zs else "")
        L += ["", f"## Perplexity of the base LM (`{cfg['text']}`, windows of {cfg['ppl_max_length']}, "
                  f"stride {cfg['ppl_stride']})" + (" and zero-shot accuracy" if zs else ""), ""]
        if zs:
            first = next(iter(zs.values()))["tasks"]
            L += [f"Zero-shot: first {cfg.get('zeroshot_limit')} documents of each task ("
                  + ", ".join(f"{t} {first[t]['metric']}" for t in tasks) + "), scored as lm-eval-harness scores "
                  "them (`ternlm eval --tasks`); numerics in brackets.", ""]
        L += [head, "|---" * (3 + (len(tasks) + 1 if zs else 0)) + "|"]
        for name, p in ppl.items():
            z = zs.get(name)
            extra = ""
            if zs:
                extra = ("".join(f" {100 * z['tasks'][t]['value']:.1f} |" for t in tasks)
                         + f" **{100 * z['average']:.1f}** ({z['numerics']}) |") if z else " — |" * (len(tasks) + 1)
            if "skipped" in p:
                L.append(f"| {name} | — ({p['skipped']}) | — |" + extra)
            else:
                L.append(f"| {name} | {p['perplexity']:.2f} | {p['n_tokens']} |" + extra)
    dist = r.get("distillation")
    if dist:
        L += ["", "## Distillation of the pt-bitnet LM", "",
              f"{dist['steps']} steps, {dist['tokens']:,} tokens, {dist['train_seconds']:.0f} s of training from the "
              f"float model (KL on logits): perplexity {dist['ppl_before']:.2f} -> {dist['ppl_after']:.2f} "
              f"({dist['ppl_before'] / dist['ppl_after']:.2f}x lower). Packed checkpoint: `{dist['checkpoint']}`."]
    fp = r.get("footprint")
    if fp:
        L += ["", "## Weight memory", "",
              f"{fp['n_params_quantized']:,} of {fp['n_params_total']:,} parameters are in quantized layers.", "",
              "| storage | whole model | quantized layers | rest |", "|---|---|---|---|"]
        for k, d in fp["formats"].items():
            L.append(f"| {k} | {_mb(d['total_bytes'])} | {_mb(d['quantized_bytes'])} | {_mb(d['rest_bytes'])} |")
        L += ["", "In memory during this run (parameters + buffers actually held):", ""]
        for name, v in var.items():
            L.append(f"- {name}: {_mb(v['cost']['model_bytes_in_memory'])}")
        L += ["", "BitLinear keeps latent fp32 weights for training, so ternary variants are not smaller *here*; "
                  "the packed formats (2-bit, 1.6-bit) hold real ternary integers."]
        pk = r.get("packed")
        if pk:
            act = "A16 (float activations)" if pk["act_bits"] is None else f"A{pk['act_bits']}"
            L += ["", f"**ternary_qat converted for inference** (packed {pk['fmt']} `TernaryLinear`, W1.58{act}, "
                      f"compiled kernels): F1 {_fmt(pk['f1'])}, accuracy {_fmt(pk['accuracy'])}; "
                      f"{_mb(pk['model_bytes_before'])} → {_mb(pk['model_bytes_in_memory'])} in memory; "
                      f"{_fmt(pk['latency_batch1']['ms_per_message'], 2)} ms/msg at batch 1, "
                      f"{_fmt(pk['latency_batch32']['ms_per_message'], 2)} at batch 32."]
        L += ["", f"Peak RSS of the run: {r.get('peak_rss_mb', 0):.0f} MB."]
    stages = r.get("stages")
    if stages:
        L += ["", "## Where the time and memory go", "", "| stage | wall (s) | peak RSS (MB) |", "|---|---|---|"]
        L += [f"| {st['stage']} | {st['seconds']:.0f} | {st['peak_rss_mb']:.0f} |" for st in stages]
        if not all(st.get("own_peak", True) for st in stages):
            L += ["", "(This OS cannot reset the peak-RSS mark: each peak is the process peak so far.)"]
    rob = {n: v["robustness"] for n, v in var.items() if "robustness" in v}
    if rob:
        kinds = [k for k in next(iter(rob.values())) if k != "clean"]
        L += ["", f"## Robustness (F1 under perturbed input, rate {cfg['robustness_rate']}, seed {cfg['seed']})", "",
              "| variant | clean | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
        for n, rr in rob.items():
            L.append(f"| {n} | {_fmt(rr['clean']['f1'])} | " + " | ".join(_fmt(rr[k]['f1']) for k in kinds) + " |")
    gen = r.get("generation", {})
    if gen:
        L += ["", "## Generation samples (greedy)", ""]
        for name, samples in gen.items():
            for s in samples:
                comp = s["completion"].replace("\n", " ")
                L.append(f"- **{name}** — *{s['prompt']}*{comp}")
    if r.get("plots"):
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]]
    env = r["environment"]
    L += ["", "## Environment", "",
          f"ternlm {env['ternlm']}, torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, "
          f"{env['threads']} threads, {env['platform']}. Wall time {r.get('wall_seconds', 0):.0f} s.", ""]
    return "\n".join(L)


def plot_all(report: dict, out: Path, weights: dict, layer: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ternlm.fileio import save_figure

    files = []

    def save(fig, name):
        save_figure(fig, out / name, dpi=110, bbox_inches="tight")
        files.append(name)

    # weight histograms of one layer: original vs each quantizer
    if weights:
        n = len(weights)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), sharey=True)
        axes = [axes] if n == 1 else axes
        lim = float(weights["fp32"].abs().quantile(0.999)) if "fp32" in weights else None
        for ax, (name, w) in zip(axes, weights.items()):
            w = w.flatten()
            if w.numel() > 200_000:
                w = w[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
            ax.hist(w.numpy(), bins=121, range=(-lim, lim) if lim else None, color="#3465a4")
            ax.set_title(name, fontsize=9)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.8)  # log axis from 1 count, so a ternary layer's zero bar is visible
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel("count (log)")
        fig.suptitle(f"weights of {layer} (x: weight value)", fontsize=10, y=1.03)
        save(fig, "weights_hist.png")

    # training curves
    tr = report.get("training", {})
    if tr.get("ternary_qat") or tr.get("fp32"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if tr.get("fp32"):
            ax.plot(tr["fp32"]["step"], _smooth(tr["fp32"]["loss"]), label="fp32 fine-tune", color="gray")
        for i, h in enumerate(tr.get("ternary_qat", [])):
            ax.plot(h["step"], _smooth(h["loss"]), label=f"ternary QAT seed {report['qat_seeds']['seeds'][i]}")
        if tr.get("lm_qat"):
            ax2 = ax.twinx()
            ax2.plot(tr["lm_qat"]["step"], _smooth(tr["lm_qat"]["loss"]), color="tab:red", alpha=0.6, label="LM QAT")
            ax2.set_ylabel("LM loss", color="tab:red")
        ax.set_xlabel("step")
        ax.set_ylabel("classification loss (smoothed)")
        ax.legend(fontsize=8)
        ax.set_title("training curves")
        save(fig, "training_curves.png")

    # metric comparison
    var = report["variants"]
    if var:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        names = list(var)
        width = 0.8 / len(METRICS)
        for j, m in enumerate(METRICS):
            ax.bar([i + j * width for i in range(len(names))], [var[n][m] for n in names], width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8, ncol=4, loc="lower right")
        ax.set_title("spam classification, test split")
        save(fig, "metrics.png")

    rob = {n: v["robustness"] for n, v in var.items() if "robustness" in v}
    if rob:
        kinds = list(next(iter(rob.values())))
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(rob)
        for j, (n, rr) in enumerate(rob.items()):
            ax.bar([i + j * width for i in range(len(kinds))], [rr[k]["f1"] for k in kinds], width, label=n)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, fontsize=8)
        ax.set_ylabel("F1")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, ncol=3, loc="lower right")
        ax.set_title("robustness to perturbed input")
        save(fig, "robustness.png")
    return files


def _smooth(xs, k: int = 10):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc = x if i == 0 else (1 - 1 / k) * acc + x / k
        out.append(acc)
    return out
