"""``ternlm compare RUN_DIR...``: one table and one plot from several ``ternlm train`` runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ternlm.errors import TernlmError
from ternlm.train.energy import FORMULA, energy_per_token, weight_bytes


@dataclass
class CompareConfig:
    runs: tuple = ()
    out: str | None = None   # directory for compare.md / compare.json / compare.png
    seq_len: int | None = None  # context for the attention term of the energy estimate (None: the runs')

    def __post_init__(self):
        self.runs = tuple(str(r) for r in self.runs)
        if not self.runs:
            raise TernlmError("compare needs at least one run directory")
        if self.seq_len is not None and self.seq_len < 1:
            raise TernlmError("seq_len must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["runs"] = list(self.runs)
        return d


def read_run(run_dir: str | Path) -> dict:
    from ternlm.train.scratch import LOG_FILE, SUMMARY_FILE

    d = Path(run_dir).expanduser()
    p = d / SUMMARY_FILE
    if not p.is_file():
        raise TernlmError(f"{d} is not a finished 'ternlm train' run ({SUMMARY_FILE} missing)")
    try:
        s = json.loads(p.read_text())
        rows = [json.loads(line) for line in (d / LOG_FILE).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise TernlmError(f"cannot read run {d}: {e}") from None
    s["dir"], s["log"] = str(d), rows
    return s


def _fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB"


def _arith(s: dict) -> str:
    return "fp16" if s["variant"] == "fp" else s["variant"]


def compare(cfg: CompareConfig) -> dict:
    """Rows per run (loss, convergence, speed, memory, energy), the markdown table and the plot."""
    from ternlm.fileio import atomic_write_text, check_output_dir, save_json

    if cfg.out:
        check_output_dir(cfg.out)
    runs = [read_run(r) for r in cfg.runs]
    fp = next((r for r in runs if r["variant"] == "fp" and not r["config"].get("knowledge_tokens")), None)
    target = fp["final_val_loss"] if fp else None
    rows = []
    fp_energy = None
    for r in runs:
        seq = cfg.seq_len or r["config"]["seq_len"]
        e45 = energy_per_token(r["linear_shapes"], r["model_shape"], _arith(r), seq, "45nm")
        e7 = energy_per_token(r["linear_shapes"], r["model_shape"], _arith(r), seq, "7nm")
        if r is fp:
            fp_energy = e45
        reach = None
        if target is not None:
            reach = next((x["tokens"] for x in r["log"] if "val_loss" in x and x["val_loss"] <= target), None)
        rows.append({"run": r["dir"], "label": r["label"], "variant": r["variant"],
                     "final_val_loss": r["final_val_loss"], "final_val_ppl": r["final_val_ppl"],
                     "tokens": r["tokens"], "tokens_to_fp_loss": reach,
                     "seconds_per_step": r["seconds_per_step"],
                     "weight_bytes": weight_bytes(r["linear_shapes"], r["n_params"]),
                     "energy_pj_45nm": e45, "energy_pj_7nm": e7})
    if fp_energy is None:  # no fp run: compare against fp16 arithmetic of the first run's shapes
        r0 = runs[0]
        fp_energy = energy_per_token(r0["linear_shapes"], r0["model_shape"], "fp16",
                                     cfg.seq_len or r0["config"]["seq_len"], "45nm")
    fp_step = next((x["seconds_per_step"] for x in rows if fp and x["run"] == fp["dir"]), None)
    for x in rows:
        x["block_energy_saving_vs_fp16"] = fp_energy["blocks"] / x["energy_pj_45nm"]["blocks"]
        x["step_time_vs_fp"] = (x["seconds_per_step"] / fp_step) if fp_step and x["seconds_per_step"] else None
        x["val_loss_vs_fp"] = (x["final_val_loss"] / target) if target and x["final_val_loss"] else None
    text = table(rows)
    report = {"config": cfg.to_dict(), "rows": rows, "formula": FORMULA, "text": text}
    if cfg.out:
        out = Path(cfg.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        save_json({k: v for k, v in report.items() if k != "text"}, out / "compare.json")
        atomic_write_text(out / "compare.md", text + "\n")
        report["plot"] = str(plot(runs, out / "compare.png"))
    return report


def table(rows: list[dict]) -> str:
    head = ("| run | val loss | val ppl | loss / fp | tokens to fp loss | s/step | step / fp | weights fp32 | bf16 "
            "| 2-bit | 1.6-bit | blocks pJ/tok 45nm | 7nm | all matmuls pJ/tok 45nm | block saving vs fp16 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for x in rows:
        w = x["weight_bytes"]
        f = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
        lines.append(
            f"| {x['label']} | {f(x['final_val_loss'], '.4f')} | {f(x['final_val_ppl'], '.2f')} "
            f"| {f(x['val_loss_vs_fp'], '.3f')} | {f(x['tokens_to_fp_loss'], ',')} "
            f"| {f(x['seconds_per_step'], '.3f')} | {f(x['step_time_vs_fp'], '.2f')} | {_fmt_bytes(w['fp32'])} "
            f"| {_fmt_bytes(w['bf16'])} | {_fmt_bytes(w.get('2bit'))} | {_fmt_bytes(w.get('1.6bit'))} "
            f"| {x['energy_pj_45nm']['blocks']:,.0f} | {x['energy_pj_7nm']['blocks']:,.0f} "
            f"| {x['energy_pj_45nm']['total']:,.0f} | {x['block_energy_saving_vs_fp16']:.1f}x |")
    return "\n".join(lines) + "\n\nEnergy estimate (matmul arithmetic only):\n" + FORMULA


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ev = [x for x in r["log"] if "val_loss" in x]
        line, = ax.plot([x["tokens"] for x in ev], [x["val_loss"] for x in ev], marker="o", ms=3,
                        label=f"{r['label']} (val)")
        tr = [x for x in r["log"] if "loss" in x]
        ax.plot([x["tokens"] for x in tr], [x["loss"] for x in tr], color=line.get_color(), alpha=0.3, lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (val: markers, train: faint)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from ternlm.fileio import save_figure

    return save_figure(fig, path, dpi=120)
