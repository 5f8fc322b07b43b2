"""``ternlm pipeline``: the end-to-end experiment.

1. fine-tune the full-precision classifier on SMS spam -> metrics
2. ternary PTQ of that classifier -> metrics
2b. calibrated ternary PTQ (pt-bitnet) of that classifier -> metrics
3. QAT fine-tune of the ternary classifier (one or more seeds), from the pt-bitnet classifier
   (default when pt-bitnet runs) or from absmean ternarization -> metrics
4. the int8 baselines (absmax, zero-point, LLM.int8) -> metrics
5. perplexity of the base LM under each quantizer (and after LM QAT when a training text is given)

Every number in the report is measured in the run; the full config is saved with it, and each
stage's wall time and peak RSS (``report["stages"]``).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ternlm.config import QuantConfig, TernaryConfig, config_to_dict, method_config
from ternlm.errors import TernlmError
from ternlm.train.classify import ClassifierTrainConfig

BASELINES = ("int8_absmax", "int8_zeropoint", "llm_int8")
VARIANTS = ("fp32", "ternary_ptq", "ternary_ptbitnet", "ternary_qat") + BASELINES
QAT_INITS = ("auto", "ptbitnet", "absmean")


@dataclass
class PipelineConfig:
    model: str = "gpt2"
    gguf_file: str | None = None
    random_init: bool = False
    data: str = "ucirvine/sms_spam"
    text: str = "wikitext"                # perplexity text: hub id or local file/dir
    text_config: str = "wikitext-2-raw-v1"
    text_split: str = "test"
    out: str = "runs/pipeline"
    seed: int = 0
    # classification fine-tuning
    max_length: int = 64
    batch_size: int = 16
    epochs: float = 1.0
    lr: float = 5e-5
    qat_epochs: float = 2.0
    qat_lr: float = 3e-4
    qat_seeds: int = 1
    qat_init: str = "auto"               # QAT start: ptbitnet, absmean, or auto (ptbitnet when it runs)
    ternary: TernaryConfig = field(default_factory=TernaryConfig)
    limit_train: int | None = None       # stratified subsample of the training split (quick runs)
    limit_test: int | None = None
    limit_val: int | None = 300          # stratified subsample of the validation split (recipe choices)
    dedupe: bool = True                  # drop exact duplicate messages before splitting (no test message in train)
    # QAT recipes tried on the validation split, "init@lr" (init: ptbitnet or absmean); the best
    # validation F1 becomes ternary_qat. Empty: the one recipe qat_init / qat_lr, no choice made.
    qat_select: tuple = ()
    eval_batch_size: int = 32
    # perplexity
    ppl_max_length: int = 256
    ppl_stride: int = 256
    ppl_windows: int | None = 40
    lm_qat_text: str | None = None       # train text for LM QAT (omit to skip)
    lm_qat_steps: int = 0
    lm_qat_lr: float = 3e-4
    lm_qat_batch_size: int = 4
    # cost, robustness, samples
    latency_messages: int = 64
    robustness: bool = True
    robustness_limit: int | None = 400
    robustness_rate: float = 0.1
    prompts: tuple = ("The history of the city", "In 1998, the team")
    gen_tokens: int = 30
    baselines: tuple = BASELINES
    # calibrated PTQ (ternlm.ptq, pt-bitnet): the classifier is calibrated on training messages, the
    # base LM (perplexity section) on calib_text (default: lm_qat_text; never the perplexity text)
    ptbitnet: bool = True
    calib_text: str | None = None
    ptb_calib_tokens: int = 4096
    ptb_seq_len: int = 128
    ptb_group_size: int = 128
    ptb_reconstruct_steps: int = 16
    # short distillation of the pt-bitnet base LM from the float model (ternlm.train.distill), on
    # distill_text (default: the calibration text; never the perplexity text); 0 steps = skip
    distill_steps: int = 0
    distill_text: str | None = None
    distill_lr: float = 1e-3
    distill_batch_size: int = 2
    distill_block_size: int = 128
    # zero-shot tasks (ternlm.eval.zeroshot) for every LM variant: first N documents per task, 0 = skip
    zeroshot_limit: int = 0
    zeroshot_tasks: str = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada,boolq"
    zeroshot_tasks_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.qat_seeds < 1:
            raise TernlmError("qat_seeds must be >= 1")
        for name in ("limit_train", "limit_test", "limit_val", "ppl_windows", "robustness_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise TernlmError(f"{name} must be >= 1")
        if self.lm_qat_steps < 0:
            raise TernlmError("lm_qat_steps must be >= 0")
        if self.lm_qat_batch_size < 1:
            raise TernlmError("lm_qat_batch_size must be >= 1")
        if self.qat_init not in QAT_INITS:
            raise TernlmError(f"unknown qat_init {self.qat_init!r}; choose from {', '.join(QAT_INITS)}")
        if self.qat_init == "ptbitnet" and not self.ptbitnet:
            raise TernlmError("qat_init ptbitnet needs the pt-bitnet variant; drop --no-ptbitnet or use --qat-init absmean")
        if self.distill_steps < 0:
            raise TernlmError("distill_steps must be >= 0")
        if self.distill_steps and not self.ptbitnet:
            raise TernlmError("distill_steps needs the pt-bitnet variant (it distils the pt-bitnet LM); drop --no-ptbitnet")
        if self.ptbitnet:
            self.ptbitnet_config(self.ptb_calib_tokens)  # validates the pt-bitnet settings now
        self.prompts = tuple(self.prompts)
        self.baselines = tuple(self.baselines)
        self.qat_select = tuple(self.qat_select)
        for c in self.qat_select:
            init, lr = self.qat_recipe(c)
            if init == "ptbitnet" and not self.ptbitnet:
                raise TernlmError(f"QAT recipe {c!r} starts from pt-bitnet; drop --no-ptbitnet")
        if self.zeroshot_limit < 0:
            raise TernlmError("zeroshot_limit must be >= 0")
        if self.zeroshot_limit:
            self.zeroshot_config()  # unknown task names fail now
        for b in self.baselines:
            if b not in BASELINES:
                raise TernlmError(f"unknown baseline method {b!r}; choose from {', '.join(BASELINES)}")

    @staticmethod
    def qat_recipe(spec: str) -> tuple[str, float]:
        """``"ptbitnet@1e-4"`` -> ("ptbitnet", 1e-4)."""
        init, _, lr = str(spec).partition("@")
        try:
            value = float(lr)
        except ValueError:
            value = -1.0
        if init not in ("ptbitnet", "absmean") or not value > 0:
            raise TernlmError(f"bad QAT recipe {spec!r}: expected INIT@LR with INIT ptbitnet or absmean, e.g. "
                              f"ptbitnet@1e-4")
        return init, value

    def zeroshot_config(self):
        from ternlm.eval.zeroshot import ZeroShotConfig

        return ZeroShotConfig(tasks=self.zeroshot_tasks, limit=self.zeroshot_limit, tasks_dir=self.zeroshot_tasks_dir)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ternary"] = config_to_dict(self.ternary)
        d["prompts"] = list(self.prompts)
        d["baselines"] = list(self.baselines)
        return d

    def ptbitnet_config(self, calib_tokens: int):
        from ternlm.ptq import PTBitNetConfig

        act = self.ternary.act_bits if self.ternary.act_bits in (None, 8) else None
        return PTBitNetConfig(calib_tokens=calib_tokens, seq_len=self.ptb_seq_len, group_size=self.ptb_group_size,
                              reconstruct_steps=self.ptb_reconstruct_steps, seed=self.seed, act_bits=act)

    def qat_start(self) -> str:
        """Where QAT starts: "ptbitnet" (the calibrated classifier) or "absmean"."""
        if self.qat_init == "auto":
            return "ptbitnet" if self.ptbitnet else "absmean"
        return self.qat_init

    def classifier_train(self, qat: bool, seed: int, lr: float | None = None) -> ClassifierTrainConfig:
        lr = lr if lr is not None else (self.qat_lr if qat else self.lr)
        return ClassifierTrainConfig(epochs=self.qat_epochs if qat else self.epochs, lr=lr,
                                     batch_size=self.batch_size, max_length=self.max_length, seed=seed)


def _quant_config(variant: str, cfg: PipelineConfig) -> QuantConfig:
    if variant.startswith("ternary"):
        return QuantConfig(weights=cfg.ternary)
    return QuantConfig(weights=method_config(variant))


def _log(cfg: PipelineConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[ternlm] {msg}", flush=True)


@contextmanager
def _stage(stages: list, name: str):
    """Append a stage's wall time and peak RSS to ``stages`` (the high-water mark is reset
    at the start of each stage where the OS allows it, so each peak is the stage's own)."""
    from ternlm.eval.cost import peak_rss_mb, release_freed_memory, reset_peak_rss

    release_freed_memory()
    own = reset_peak_rss()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        release_freed_memory()
        stages.append({"stage": name, "seconds": time.perf_counter() - t0,
                                                "peak_rss_mb": peak_rss_mb(), "own_peak": own})





def environment() -> dict:
    import transformers

    import ternlm
    from ternlm.quant.llm_int8 import bitsandbytes_status

    return {"ternlm": ternlm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor(),
            "threads": torch.get_num_threads(), "bitsandbytes": bitsandbytes_status()[1]}


def _describe_variant(model) -> dict:
    from ternlm.nn.int8_linear import LLMInt8Linear

    info = {}
    llm = [m for m in model.modules() if isinstance(m, LLMInt8Linear)]
    if llm:
        info["llm_int8_backend"] = f"{llm[0].backend} ({llm[0].backend_detail})"
    return info


def _latency(model, tok, test, cfg: PipelineConfig) -> dict:
    """ms per message at batch 1 (16 messages) and batch 32 (``cfg.latency_messages``)."""
    from ternlm.eval.cost import latency_per_message

    texts = test.texts[:cfg.latency_messages]
    return {"latency_batch1": latency_per_message(model, tok, texts[:16], batch_size=1, max_length=cfg.max_length),
            "latency_batch32": latency_per_message(model, tok, texts, batch_size=32, max_length=cfg.max_length)}


def _val_metrics(model, tok, val, cfg) -> dict:
    """Metrics on the validation split: what recipe choices are made on (never the test split)."""
    from ternlm.eval.classification import evaluate_classifier

    if not len(val):
        return {}
    res = evaluate_classifier(model, tok, val.texts, val.labels, progress=False, batch_size=cfg.eval_batch_size,
                              max_length=cfg.max_length)
    return {k: res[k] for k in ("accuracy", "precision", "recall", "f1") if k in res} | {"n": len(val)}


def _evaluate_variant(name, model, tok, test, cfg, targets, val=None) -> dict:
    from ternlm.eval.classification import evaluate_classifier
    from ternlm.eval.cost import current_rss_mb, model_bytes, release_freed_memory
    from ternlm.eval.robustness import robustness_eval
    from ternlm.eval.zeroshot import describe_model
    from ternlm.nn.verify import verify

    t0 = time.perf_counter()
    ev = dict(batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
    res = evaluate_classifier(model, tok, test.texts, test.labels, progress=cfg.progress, **ev)
    res.update(_describe_variant(model))
    res["numerics"] = describe_model(model)["precision"]
    if val is not None:
        res["val"] = _val_metrics(model, tok, val, cfg)
    release_freed_memory()
    res["cost"] = {**_latency(model, tok, test, cfg), "model_bytes_in_memory": model_bytes(model),
                   "rss_mb": current_rss_mb()}
    if name.startswith("ternary"):
        res["verify"] = verify(model, targets).totals()
    if cfg.robustness:
        n = cfg.robustness_limit or len(test)
        rt, rl = test.texts[:n], test.labels[:n]
        res["robustness"] = robustness_eval(
            lambda t, l: evaluate_classifier(model, tok, t, l, progress=False, **ev),
            rt, rl, seed=cfg.seed, rate=cfg.robustness_rate)
    res["eval_seconds"] = time.perf_counter() - t0
    _log(cfg, f"{name} ({res['numerics']}): acc={res['accuracy']:.4f} f1={res['f1']:.4f} "
              f"precision={res['precision']:.4f} recall={res['recall']:.4f}"
              + (f"; validation f1={res['val']['f1']:.4f}" if res.get("val") else ""))
    return res


def check_inputs(cfg: PipelineConfig) -> None:
    """Every path and option checked before any model is loaded or trained (one-line errors)."""
    from ternlm.data.text import check_source
    from ternlm.fileio import check_output_dir
    from ternlm.models.loading import source_kind

    check_source(cfg.data, "data file")
    check_source(cfg.text, "text file")
    check_source(cfg.lm_qat_text, "LM QAT text file")
    check_source(cfg.distill_text, "distillation text file")
    if cfg.distill_steps and not (cfg.distill_text or cfg.calib_text or cfg.lm_qat_text):
        raise TernlmError("distill_steps needs training text: --distill-text (or --calib-text / --lm-qat-text)")
    check_source(cfg.calib_text, "calibration text file")
    if bool(cfg.lm_qat_text) != bool(cfg.lm_qat_steps):
        raise TernlmError("--lm-qat-text and --lm-qat-steps go together (give both, or neither)")
    check_output_dir(cfg.out)
    if cfg.zeroshot_limit:
        cfg.zeroshot_config().check()
    kind = source_kind(cfg.model, cfg.gguf_file)
    if kind in ("ternlm", "ternlm-gguf"):
        raise TernlmError(f"{cfg.model} is a packed ternary model; the pipeline starts from a float model")


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every step, write report.json / report.md / plots into ``cfg.out``; return the report."""
    from ternlm.data.sms import dedupe, load_sms_spam, split_dataset, subsample
    from ternlm.data.text import load_text
    from ternlm.eval.cost import peak_rss_mb, weight_footprint
    from ternlm.models.loading import load
    from ternlm.nn.surgery import quantize_model, select_targets, trainable_from_packed
    from ternlm.report import write_report
    from ternlm.train.classify import train_classifier
    from ternlm.train.common import seed_everything

    t_start = time.perf_counter()
    check_inputs(cfg)
    out = Path(cfg.out)  # created only when the report is written
    seed_everything(cfg.seed)

    # ---- data first (seconds; a malformed file fails before any model loads), then the model
    stages: list = []
    with _stage(stages, "load data and model"):
        ds = load_sms_spam(cfg.data)
        n_dup = 0
        if cfg.dedupe:  # before splitting: no message in both training and test
            ds, n_dup = dedupe(ds)
        train, val, test = split_dataset(ds, seed=cfg.seed)
        if cfg.limit_train and cfg.limit_train < len(train):
            train = subsample(train, cfg.limit_train, seed=cfg.seed)
        if cfg.limit_test and cfg.limit_test < len(test):
            test = subsample(test, cfg.limit_test, seed=cfg.seed)
        if cfg.limit_val and cfg.limit_val < len(val):
            val = subsample(val, cfg.limit_val, seed=cfg.seed)
        text = load_text(cfg.text, config=cfg.text_config, split=cfg.text_split)
        fp, tok = load(cfg.model, task="classification", gguf_file=cfg.gguf_file, random_init=cfg.random_init)
        if tok is None:
            raise TernlmError(f"no tokenizer files in {cfg.model}")
    _log(cfg, f"data: {len(ds)} messages ({sum(ds.labels)} spam, {ds.n_malformed} malformed rows skipped, "
              f"{n_dup} duplicates dropped); train {len(train)} / val {len(val)} / test {len(test)}")
    targets = select_targets(fp, QuantConfig(weights=cfg.ternary))
    report = {"config": cfg.to_dict(), "environment": environment(),
              "data": {"source": ds.source, "n_messages": len(ds), "n_spam": int(sum(ds.labels)),
                       "n_malformed": ds.n_malformed, "malformed_examples": ds.malformed_examples[:5],
                       "n_duplicates_dropped": n_dup, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                       "train_test_overlap": len(set(train.texts) & set(test.texts))},
              "model": {"name": cfg.model, "architecture": type(fp).__name__,
                        "n_params": sum(p.numel() for p in fp.parameters()),
                        "quantized_layers": targets},
              "footprint": weight_footprint(fp, targets),
              "variants": {}, "training": {}, "stages": stages}

    # ---- 1. full precision fine-tune
    _log(cfg, "1/5 fine-tuning the full-precision classifier")
    with _stage(stages, "1 fp32 fine-tune + eval"):
        report["training"]["fp32"] = train_classifier(fp, tok, train.texts, train.labels,
                                                      cfg.classifier_train(False, cfg.seed),
                                                      progress=cfg.progress, desc="fp32 fine-tune")
        report["variants"]["fp32"] = _evaluate_variant("fp32", fp, tok, test, cfg, targets, val)
    layer = targets[0]
    weights_for_plot = {"fp32": fp.get_submodule(layer).weight.detach().clone()}

    # ---- 2. ternary PTQ
    _log(cfg, "2/5 ternary post-training quantization")
    with _stage(stages, "2 absmean PTQ + eval"):
        ptq = quantize_model(copy.deepcopy(fp), _quant_config("ternary_ptq", cfg))
        report["variants"]["ternary_ptq"] = _evaluate_variant("ternary_ptq", ptq, tok, test, cfg, targets, val)
        weights_for_plot["ternary"] = _plot_weight(ptq, layer)
        del ptq

    # ---- 2b. calibrated ternary PTQ (pt-bitnet), calibrated on training messages
    qat_from = cfg.qat_start()
    ptb = None
    needs_ptb = qat_from == "ptbitnet" or any(cfg.qat_recipe(c)[0] == "ptbitnet" for c in cfg.qat_select)
    if cfg.ptbitnet:
        _log(cfg, "2b/5 calibrated ternary PTQ (pt-bitnet) on training messages")
        with _stage(stages, "2b pt-bitnet PTQ + eval"):
            ptb = copy.deepcopy(fp)
            report["ptbitnet"] = {"classifier": _ptbitnet(ptb, tok, "\n".join(train.texts), cfg)}
            report["variants"]["ternary_ptbitnet"] = _evaluate_variant("ternary_ptbitnet", ptb, tok, test, cfg,
                                                                       targets, val)
            weights_for_plot["ternary_ptbitnet"] = _plot_weight(ptb, layer)
            # the same packed codes at the other activation precision (W1.58A16 <-> W1.58A8)
            other = _other_act(cfg)
            with _act_bits(ptb, other):
                report["variants"][f"ternary_ptbitnet_{_act_name(other)}"] = _evaluate_variant(
                    f"ternary_ptbitnet_{_act_name(other)}", ptb, tok, test, cfg, targets, val)
            if not needs_ptb:
                ptb = None
    ptb_all = ptb

    # ---- 3. ternary QAT (several seeds when asked), from the pt-bitnet classifier or absmean
    _log(cfg, f"3/5 ternary QAT fine-tuning from the {qat_from} classifier ({cfg.qat_seeds} seed(s))")
    seeds = [cfg.seed + i for i in range(cfg.qat_seeds)]
    qat_runs = []
    with _stage(stages, "3 ternary QAT + eval + packed eval"):
        def qat_start(init: str):
            if init == "ptbitnet":  # learned-scale BitLinears starting at the calibrated codes and scales
                return trainable_from_packed(copy.deepcopy(ptb_all))
            return quantize_model(copy.deepcopy(fp), _quant_config("ternary_qat", cfg))

        qat_lr = cfg.qat_lr
        if cfg.qat_select:  # the recipe is chosen on the validation split, never the test split
            tried = []
            for spec in cfg.qat_select:
                init, lr = cfg.qat_recipe(spec)
                m = qat_start(init)
                train_classifier(m, tok, train.texts, train.labels, cfg.classifier_train(True, cfg.seed, lr),
                                 progress=cfg.progress, desc=f"QAT {spec}")
                tried.append({"recipe": spec, "init": init, "lr": lr, "val": _val_metrics(m, tok, val, cfg)})
                _log(cfg, f"QAT recipe {spec}: validation f1={tried[-1]['val'].get('f1', float('nan')):.4f}")
                del m
            best = max(tried, key=lambda t: (t["val"].get("f1", 0.0), t["val"].get("accuracy", 0.0)))
            qat_from, qat_lr = best["init"], best["lr"]
            report["qat_selection"] = {"tried": tried, "chosen": best["recipe"], "on": f"validation ({len(val)})"}
            _log(cfg, f"QAT recipe chosen on the validation split: {best['recipe']}")
        for i, s in enumerate(seeds):
            qat = qat_start(qat_from)
            hist = train_classifier(qat, tok, train.texts, train.labels, cfg.classifier_train(True, s, qat_lr),
                                    progress=cfg.progress, desc=f"QAT seed {s}")
            res = _evaluate_variant(f"ternary_qat[seed {s}]", qat, tok, test, cfg, targets, val)
            res["init"] = qat_from
            res["lr"] = qat_lr
            qat_runs.append({"seed": s, "history": hist, "metrics": res})
            if i == 0:
                report["variants"]["ternary_qat"] = res
                weights_for_plot["ternary_qat"] = _plot_weight(qat, layer)
                report["packed"] = _packed_section(qat, tok, test, cfg)
            del qat
        del ptb, ptb_all
    report["training"]["ternary_qat"] = [r["history"] for r in qat_runs]
    f1s = [r["metrics"]["f1"] for r in qat_runs]
    report["qat_seeds"] = {"seeds": seeds, "init": qat_from, "lr": qat_lr, "f1": f1s,
                           "accuracy": [r["metrics"]["accuracy"] for r in qat_runs],
                           "f1_mean": statistics.fmean(f1s), "f1_std": statistics.pstdev(f1s) if len(f1s) > 1 else 0.0}

    # ---- 4. int8 baselines
    _log(cfg, "4/5 int8 baselines")
    for name in cfg.baselines:
        with _stage(stages, f"4 {name} + eval"):
            m = quantize_model(copy.deepcopy(fp), _quant_config(name, cfg))
            report["variants"][name] = _evaluate_variant(name, m, tok, test, cfg, targets, val)
            weights_for_plot[name] = _plot_weight(m, layer)
            del m
    del fp

    # ---- 5. perplexity of the base LM
    _log(cfg, "5/5 perplexity of the base language model under each quantizer")
    report["perplexity"], report["generation"], lm_hist, distilled, zs = _lm_section(cfg, tok, text, stages)
    if zs:
        report["zeroshot"] = zs
    if lm_hist is not None:
        report["training"]["lm_qat"] = lm_hist
    if distilled is not None:
        report["distillation"] = distilled

    own = all(st["own_peak"] for st in stages)
    report["peak_rss_mb"] = max(st["peak_rss_mb"] for st in stages) if own else peak_rss_mb()
    report["wall_seconds"] = time.perf_counter() - t_start
    write_report(report, out, weights_for_plot, layer)
    _log(cfg, f"wrote {out / 'report.json'}, {out / 'report.md'} and plots in {report['wall_seconds']:.0f}s; "
              f"peak RSS {report['peak_rss_mb'] / 1024:.2f} GiB")
    return report


def _ptbitnet(model, tok, text: str, cfg: PipelineConfig) -> dict:
    """pt-bitnet on ``model`` in place (packed TernaryLinear layers), calibrated on ``text``: as many
    sequences of ``ptb_seq_len`` as it holds, up to ``ptb_calib_tokens``. Returns the PTQ log."""
    from ternlm.ptq import calibration_ids, ptbitnet_quantize

    n_text = len(tok(text, verbose=False)["input_ids"])
    n = min(cfg.ptb_calib_tokens, n_text // cfg.ptb_seq_len * cfg.ptb_seq_len)
    if n < cfg.ptb_seq_len:
        raise TernlmError(f"calibration text too short for pt-bitnet: {n_text} tokens, need at least "
                          f"{cfg.ptb_seq_len} (--ptb-seq-len)")
    pcfg = cfg.ptbitnet_config(n)
    ids = calibration_ids(tok, text, pcfg.calib_tokens, pcfg.seq_len, pcfg.seed)
    log = ptbitnet_quantize(model, ids, pcfg, progress=cfg.progress)
    _log(cfg, f"pt-bitnet: {log['n_targets']} layers, {n} calibration tokens, {log['wall_s']:.0f} s")
    return log


def _packed_section(qat, tok, test, cfg: PipelineConfig) -> dict:
    """The QAT classifier converted to packed 2-bit TernaryLinear layers (the inference format):
    same metrics, real memory and latency. Converts ``qat`` in place."""
    from ternlm.conversion import convert
    from ternlm.eval.classification import evaluate_classifier
    from ternlm.eval.cost import model_bytes

    before = model_bytes(qat)
    convert(qat, fmt="2bit")
    ev = dict(batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
    res = evaluate_classifier(qat, tok, test.texts, test.labels, progress=False, **ev)
    out = {k: res[k] for k in ("accuracy", "precision", "recall", "f1")}
    out.update(fmt="2bit", act_bits=cfg.ternary.act_bits, model_bytes_before=before, model_bytes_in_memory=model_bytes(qat),
               **_latency(qat, tok, test, cfg))
    _log(cfg, f"ternary_qat packed (2-bit TernaryLinear): f1={out['f1']:.4f}, "
              f"{before / 1e6:.1f} MB -> {out['model_bytes_in_memory'] / 1e6:.1f} MB in memory")
    return out


def _other_act(cfg: PipelineConfig):
    """The activation precision pt-bitnet is also reported at: A8 when the run is A16, else A16."""
    return 8 if cfg.ternary.act_bits is None else None


def _act_name(bits) -> str:
    return "a16" if bits is None else f"a{bits}"


@contextmanager
def _act_bits(model, bits):
    """Run ``model``'s packed ternary layers at activation precision ``bits`` inside the block."""
    from ternlm.nn.surgery import ternary_linears

    layers = [m for _, m in ternary_linears(model)]
    before = [m.act_bits for m in layers]
    for m in layers:
        m.act_bits = bits
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.act_bits = b


@torch.no_grad()
def _plot_weight(model, layer: str) -> torch.Tensor:
    """The (out, in) weight a layer multiplies by, as a float tensor (for the histograms)."""
    from ternlm.nn.verify import effective_weight

    return effective_weight(model.get_submodule(layer)).float().clone()


def _lm_section(cfg: PipelineConfig, tok, text: str, stages: list):
    from ternlm.data.text import load_text
    from ternlm.eval.generation import generate_samples
    from ternlm.eval.perplexity import perplexity
    from ternlm.models.loading import load
    from ternlm.nn.surgery import quantize_model
    from ternlm.train.lm import LMTrainConfig, train_lm

    with _stage(stages, "5 load base LM"):
        base = load(cfg.model, gguf_file=cfg.gguf_file, random_init=cfg.random_init, tokenizer=False).model
    pp_kw = dict(max_length=cfg.ppl_max_length, stride=cfg.ppl_stride, max_windows=cfg.ppl_windows,
                 progress=cfg.progress)
    ppl, gen, zs = {}, {}, {}

    def zeroshot(name, m):
        if cfg.zeroshot_limit:
            zs[name] = _zeroshot(m, tok, cfg)
            _log(cfg, f"zero-shot {name} ({zs[name]['numerics']}): average {zs[name]['average']:.4f}")

    distill_summary = None
    for name in ("fp32", "ternary_ptq") + cfg.baselines:
        with _stage(stages, f"5 perplexity {name}"):
            m = base if name == "fp32" else quantize_model(copy.deepcopy(base), _quant_config(name, cfg))
            ppl[name] = perplexity(m, tok, text, **pp_kw)
            _log(cfg, f"perplexity {name}: {ppl[name]['perplexity']:.2f}")
            zeroshot(name, m)
            if name in ("fp32", "ternary_ptq"):
                gen[name] = generate_samples(m, tok, list(cfg.prompts), max_new_tokens=cfg.gen_tokens, seed=cfg.seed)
            del m
    calib = cfg.calib_text or cfg.lm_qat_text
    if not cfg.ptbitnet:
        ppl["ternary_ptbitnet"] = {"skipped": "pt-bitnet switched off"}
    elif calib is None:
        ppl["ternary_ptbitnet"] = {"skipped": "no calibration text (--calib-text or --lm-qat-text)"}
    else:
        with _stage(stages, "5 pt-bitnet LM + perplexity"):
            m = copy.deepcopy(base)
            _ptbitnet(m, tok, load_text(calib, config=cfg.text_config, split="validation"), cfg)
            ppl["ternary_ptbitnet"] = perplexity(m, tok, text, **pp_kw)
            gen["ternary_ptbitnet"] = generate_samples(m, tok, list(cfg.prompts), max_new_tokens=cfg.gen_tokens,
                                                       seed=cfg.seed)
            _log(cfg, f"perplexity ternary_ptbitnet: {ppl['ternary_ptbitnet']['perplexity']:.2f}")
            zeroshot("ternary_ptbitnet", m)
            other = f"ternary_ptbitnet_{_act_name(_other_act(cfg))}"
            with _act_bits(m, _other_act(cfg)):  # the same codes at the other activation precision
                ppl[other] = perplexity(m, tok, text, **pp_kw)
                _log(cfg, f"perplexity {other}: {ppl[other]['perplexity']:.2f}")
                zeroshot(other, m)
        if cfg.distill_steps:
            with _stage(stages, "5 distillation of the pt-bitnet LM"):
                ppl["ternary_ptbitnet_distilled"], gen["ternary_ptbitnet_distilled"], distill_summary, dm = \
                    _distill_section(cfg, m, tok, text, ppl["ternary_ptbitnet"])
                zeroshot("ternary_ptbitnet_distilled", dm)
                del dm
        del m
    lm_hist = None
    if cfg.lm_qat_text and cfg.lm_qat_steps:
        with _stage(stages, "5 LM QAT (absmean start) + perplexity"):
            train_text = load_text(cfg.lm_qat_text, config=cfg.text_config, split="train")
            ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
            m = quantize_model(base, _quant_config("ternary_qat", cfg))  # the last user of base: in place
            del base
            lm_hist = train_lm(m, ids, LMTrainConfig(steps=cfg.lm_qat_steps, lr=cfg.lm_qat_lr, seed=cfg.seed,
                                                     batch_size=cfg.lm_qat_batch_size,
                                                     block_size=min(128, cfg.ppl_max_length),
                                                     warmup_steps=min(10, cfg.lm_qat_steps),
                                                     weight_decay=0.0),
                               progress=cfg.progress, desc="LM QAT")
            ppl["ternary_qat"] = perplexity(m, tok, text, **pp_kw)
            gen["ternary_qat"] = generate_samples(m, tok, list(cfg.prompts), max_new_tokens=cfg.gen_tokens,
                                                  seed=cfg.seed)
            _log(cfg, f"perplexity ternary_qat (LM QAT, {cfg.lm_qat_steps} steps of {cfg.lm_qat_batch_size} x "
                      f"{min(128, cfg.ppl_max_length)} tokens): {ppl['ternary_qat']['perplexity']:.2f}")
            zeroshot("ternary_qat", m)
            del m
    else:
        ppl["ternary_qat"] = {"skipped": "no LM QAT text given (--lm-qat-text / --lm-qat-steps)"}
    return ppl, gen, lm_hist, distill_summary, zs


def _zeroshot(model, tok, cfg: PipelineConfig) -> dict:
    """Zero-shot summary of one LM variant: the average, each task's primary metric, the numerics."""
    from ternlm.eval.zeroshot import describe_model, evaluate_zeroshot

    res = evaluate_zeroshot(model, tok, cfg.zeroshot_config(), progress=cfg.progress, log=lambda *_: None)
    return {"average": res["average"], "numerics": describe_model(model)["precision"], "seconds": res["seconds"],
            "tasks": {n: {"metric": r["primary"], "value": r[r["primary"]], "n_docs": r["n_docs"]}
                      for n, r in res["tasks"].items()}}


def _distill_section(cfg: PipelineConfig, ptb, tok, text_eval: str, before: dict):
    """Distil the pt-bitnet LM ``ptb`` from the float model for ``cfg.distill_steps`` steps.

    The student is saved as a packed checkpoint under ``out/distill`` and handed to
    :func:`ternlm.train.distill.distill`, which scores it with the same perplexity protocol as the
    rest of the section. Returns (perplexity record, generation samples, summary with before/after)."""
    from ternlm.checkpoint import save_pretrained
    from ternlm.eval.generation import generate_samples
    from ternlm.eval.perplexity import perplexity
    from ternlm.models.loading import load
    from ternlm.train.distill import DistillConfig, distill

    work = Path(cfg.out) / "distill"
    student_dir = save_pretrained(ptb, tok, work / "start")
    text = cfg.distill_text or cfg.calib_text or cfg.lm_qat_text
    dcfg = DistillConfig(teacher=cfg.model, teacher_gguf_file=cfg.gguf_file, student=str(student_dir),
                         texts=(text,), text_config=cfg.text_config, text_split="validation",
                         out=str(work / "model"), steps=cfg.distill_steps, batch_size=cfg.distill_batch_size,
                         block_size=cfg.distill_block_size, lr=cfg.distill_lr,
                         warmup_steps=min(5, cfg.distill_steps), eval_text=None,
                         save_every=max(cfg.distill_steps, 1), seed=cfg.seed, progress=cfg.progress)
    _log(cfg, f"distilling the pt-bitnet LM: {cfg.distill_steps} steps of "
              f"{cfg.distill_batch_size} x {cfg.distill_block_size} tokens")
    summary = distill(dcfg)
    model, _ = load(summary["out"], tokenizer=False)
    pp_kw = dict(max_length=cfg.ppl_max_length, stride=cfg.ppl_stride, max_windows=cfg.ppl_windows,
                 progress=cfg.progress)
    after = perplexity(model, tok, text_eval, **pp_kw)
    gen = generate_samples(model, tok, list(cfg.prompts), max_new_tokens=cfg.gen_tokens, seed=cfg.seed)
    info = {"steps": summary["steps"], "tokens": summary["tokens"], "train_seconds": summary["train_seconds"],
            "ppl_before": before["perplexity"], "ppl_after": after["perplexity"], "checkpoint": summary["out"]}
    _log(cfg, f"perplexity ternary_ptbitnet after {summary['tokens']} distillation tokens: "
              f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}")
    return after, gen, info, model
