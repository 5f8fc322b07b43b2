"""Train a GPT-2 or Llama LM from scratch on token shards: full precision or ternary (W1.58A16/A8/A4).

One readable loop in the shape of nanoGPT's ``train.py``:

- the global batch is a fixed number of sequences per step, drawn from one token stream by a
  generator seeded with (seed, step); under torchrun each rank takes its contiguous slice, so
  the loss curve does not depend on the number of processes and ``--resume`` replays the same data;
- gradient accumulation over micro-batches, DDP (gloo on CPU, NCCL on GPUs), bf16 autocast on GPUs;
- eval of val loss on a fixed number of val tokens (sum and count reduced across ranks);
- checkpoints (model, optimizer, step, RNG) written atomically by rank 0; a NaN loss stops the run
  with its step number and keeps the last good checkpoint.

FSDP is the path for models that do not fit one GPU; it is not built here (DDP replicates the model).

Run directory::

    out/train_config.json   the TrainConfig (a resume must match it)
    out/log.jsonl           one JSON object per logged step / eval
    out/checkpoint/         state.pt (resume state)
    out/model/              the final HF directory (+ ternlm_knowledge.safetensors)
    out/summary.json        final val loss, timing, parameter counts, shapes for `ternlm compare`
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.errors import TernlmError

VARIANTS = {"fp": "full precision", "w158a16": "W1.58A16", "w158a8": "W1.58A8", "w158a4": "W1.58A4"}
VARIANT_ACT_BITS = {"w158a16": None, "w158a8": 8, "w158a4": 4}
TRAINING_FILE = "ternlm_training.json"  # beside a trained ternary model: its variant and activation bits
OPTIMIZERS = ("adamw", "muon")

# Named sizes: (architecture, overrides of the HF config).
MODEL_SIZES = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=2, n_positions=128)),
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_embd=256, n_head=4, n_positions=256)),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024)),
    "llama-tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=172, max_position_embeddings=128)),
    "llama-mini": ("llama", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                 intermediate_size=688, max_position_embeddings=256)),
    "llama-135m": ("llama", dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                 intermediate_size=1536, max_position_embeddings=2048)),
}
# Peak learning rates: ternary latent weights want a higher one (BitNet b1.58 recipe).
DEFAULT_LR = {"fp": 1e-3, "ternary": 2e-3}

CONFIG_FILE, LOG_FILE, SUMMARY_FILE = "train_config.json", "log.jsonl", "summary.json"
CKPT_DIR, MODEL_DIR = "checkpoint", "model"


@dataclass
class TrainConfig:
    """Everything that decides the numbers of a run (saved as train_config.json; resume must match).

    batch_size: sequences per global step (all ranks, all micro-batches together); tokens per step
        = batch_size * seq_len. micro_batch: sequences per forward on one rank.
    lr: None = 1e-3 for fp, 2e-3 for ternary. Schedule: linear warm-up over warmup_frac, cosine to
        10%. weight_decay is switched off after wd_stop_frac of the steps (None = 0.5 for ternary,
        never for fp), as in the BitNet b1.58 two-stage recipe.
    optimizer: adamw, or muon for the 2-D block matrices (AdamW for the rest).
    """

    data: str = ""
    model_config: str = "gpt2-mini"
    variant: str = "fp"
    out: str = "runs/scratch"
    knowledge_tokens: int = 0
    seq_len: int = 128
    batch_size: int = 32
    micro_batch: int = 16
    steps: int = 500
    lr: float | None = None
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    wd_stop_frac: float | None = None
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 65_536
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise TernlmError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.optimizer not in OPTIMIZERS:
            raise TernlmError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.model_config not in MODEL_SIZES and not Path(self.model_config).expanduser().exists():
            raise TernlmError(f"unknown model config {self.model_config!r}; choose one of "
                              f"{', '.join(MODEL_SIZES)} or pass a config.json / model directory")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise TernlmError(f"unknown dtype {self.dtype!r}; choose one of auto, fp32, bf16")
        for name in ("seq_len", "batch_size", "micro_batch", "steps", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise TernlmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.knowledge_tokens < 0 or self.eval_tokens < 0:
            raise TernlmError("knowledge_tokens and eval_tokens must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise TernlmError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1 or (self.wd_stop_frac is not None and not 0 <= self.wd_stop_frac <= 1):
            raise TernlmError("warmup_frac must lie in [0, 1) and wd_stop_frac in [0, 1]")

    @property
    def ternary(self) -> bool:
        return self.variant != "fp"

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR["ternary" if self.ternary else "fp"]

    @property
    def wd_stop(self) -> float:
        return self.wd_stop_frac if self.wd_stop_frac is not None else (0.5 if self.ternary else 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TernlmError(f"unknown train config keys: {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Model


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The HF GPT-2 / Llama model of a named size or config file, with the variant's BitLinears."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

    if cfg.model_config in MODEL_SIZES:
        arch, over = MODEL_SIZES[cfg.model_config]
        hf = (GPT2Config if arch == "gpt2" else LlamaConfig)(**over)
    else:
        try:
            hf = AutoConfig.from_pretrained(str(Path(cfg.model_config).expanduser()))
        except Exception as e:
            raise TernlmError(f"cannot read a model config from {cfg.model_config}: "
                              f"{str(e).splitlines()[0][:160]}") from None
    if hf.model_type not in ("gpt2", "llama"):
        raise TernlmError(f"ternlm train builds GPT-2 or Llama architectures, not {hf.model_type!r}")
    hf.vocab_size = vocab_size
    # NOTE: no dropout, so a step is a pure function of (weights, batch): resume and DDP stay exact.
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(hf, k):
            setattr(hf, k, 0.0)
    hf.tie_word_embeddings = True
    hf.bos_token_id = hf.eos_token_id = None
    max_pos = getattr(hf, "n_positions", None) or hf.max_position_embeddings
    if cfg.seq_len > max_pos:
        raise TernlmError(f"seq_len {cfg.seq_len} exceeds the model's {max_pos} positions")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(hf)
    if cfg.ternary:
        from ternlm.config import QuantConfig, TernaryConfig
        from ternlm.nn.surgery import quantize_model

        quantize_model(model, QuantConfig(weights=TernaryConfig(act_bits=VARIANT_ACT_BITS[cfg.variant])))
    if cfg.knowledge_tokens:
        from ternlm.nn.knowledge import add_knowledge_tokens

        add_knowledge_tokens(model, cfg.knowledge_tokens)
    return model


def block_matrices(model: nn.Module) -> list[str]:
    """Names of the 2-D weights inside the transformer blocks (the ones Muon may take)."""
    from ternlm.nn.surgery import block_linear_layers

    blocks = set(block_linear_layers(model)) | {n for n, m in model.named_modules() if type(m).__name__ == "BitLinear"}
    return [f"{n}.weight" for n in sorted(blocks)]


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    decay, no_decay, muon = [], [], []
    muon_names = set(block_matrices(model)) if cfg.optimizer == "muon" else set()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n in muon_names:
            muon.append(p)
        elif p.dim() >= 2 and "ternlm_knowledge" not in n:
            decay.append(p)
        else:
            no_decay.append(p)
    opts = [torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.peak_lr, betas=(0.9, 0.95))]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
                                     adjust_lr_fn="match_rms_adamw"))
    for o in opts:
        for g in o.param_groups:
            g["base_wd"] = g["weight_decay"]
    return opts


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The one schedule (``ternlm.train.common.lr_at``): linear warm-up over ``warmup_frac`` of the steps,
    then cosine decay to 10% of the peak."""
    from ternlm.train.common import lr_at as schedule

    return schedule(step, cfg.steps, int(cfg.warmup_frac * cfg.steps), cfg.peak_lr)


# ---------------------------------------------------------------------------------------------
# Data


def batch_indices(cfg: TrainConfig, step: int, n_tokens: int) -> np.ndarray:
    """Start offsets of the global batch of ``step``: the same on every rank and after a resume."""
    g = np.random.default_rng([cfg.seed, step])
    return g.integers(0, n_tokens - cfg.seq_len - 1, size=cfg.batch_size)


def windows(tokens: np.ndarray, starts, seq_len: int) -> torch.Tensor:
    """(B, seq_len + 1) int64 windows of ``tokens`` starting at ``starts``."""
    return torch.from_numpy(np.stack([np.asarray(tokens[int(s):int(s) + seq_len + 1], dtype=np.int64)
                                      for s in starts]))


def lm_loss(model: nn.Module, xy: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    x, y = xy[:, :-1], xy[:, 1:]
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist() -> Dist:
    """Single process without RANK in the environment; DDP (NCCL on GPUs, gloo on CPU) under torchrun."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local, device)


def all_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    import random

    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import random

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, raw: nn.Module, opts, step: int, cfg: TrainConfig) -> None:
    from ternlm.fileio import atomic_dir

    state = {"model": raw.state_dict(), "optimizers": [o.state_dict() for o in opts], "step": step,
             "rng": _rng_state(), "config": cfg.to_dict()}
    atomic_dir(out / CKPT_DIR, lambda tmp: torch.save(state, tmp / "state.pt"))


def check_resume(out: Path, cfg: TrainConfig) -> None:
    p = out / CONFIG_FILE
    if not p.is_file():
        raise TernlmError(f"--resume: {out} holds no run ({CONFIG_FILE} missing)")
    old = json.loads(p.read_text())
    new = cfg.to_dict()
    differ = sorted(k for k in set(old) | set(new) if k not in ("out",) and old.get(k) != new.get(k))
    if differ:
        raise TernlmError(f"--resume: {out} was trained with a different config ({', '.join(differ)}); "
                          f"use the same settings or a new -o")


def _read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto_step]


# ---------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, cfg: TrainConfig, d: Dist, autocast) -> float:
    """Mean val loss over the first eval_tokens of val (non-overlapping windows, split over ranks)."""
    n_win = max(1, min(cfg.eval_tokens, val.size - 1) // cfg.seq_len)
    starts = [i * cfg.seq_len for i in range(n_win) if (i * cfg.seq_len + cfg.seq_len + 1) <= val.size]
    mine = starts[d.rank::d.world]
    total, count = 0.0, 0.0
    model.eval()
    for i in range(0, len(mine), cfg.micro_batch):
        xy = windows(val, mine[i:i + cfg.micro_batch], cfg.seq_len).to(d.device)
        with autocast:
            total += lm_loss(model, xy, reduction="sum").item()
        count += xy[:, 1:].numel()
    model.train()
    total, count = all_sum([total, count], d)
    return total / max(count, 1.0)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) a run; returns the summary. ``stop_after`` ends the process's work after that
    many steps without finishing the run (what a kill does, used to test resume)."""
    from tqdm.auto import tqdm

    from ternlm.data.shards import load_tokens, read_meta
    from ternlm.fileio import atomic_write_text, check_output_dir, save_json

    out = check_output_dir(cfg.out)
    meta = read_meta(cfg.data)
    train_tok, val_tok = load_tokens(cfg.data, "train"), load_tokens(cfg.data, "val")
    if train_tok.size < cfg.seq_len + 2:
        raise TernlmError(f"{cfg.data}: {train_tok.size} train tokens, fewer than seq_len {cfg.seq_len} + 2")
    if resume:
        check_resume(out, cfg)
    elif (out / CONFIG_FILE).exists():
        raise TernlmError(f"{out} already holds a run; pass --resume to continue it or choose a new -o")
    d = init_dist()
    per_rank = cfg.batch_size // d.world
    if cfg.batch_size % d.world:
        raise TernlmError(f"batch_size {cfg.batch_size} is not divisible by {d.world} processes")

    raw = build_model(cfg, meta["vocab_size"]).to(d.device)
    opts = make_optimizers(raw, cfg)
    start = 0
    ckpt = out / CKPT_DIR / "state.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=d.device, weights_only=False)
        raw.load_state_dict(state["model"])
        for o, s in zip(opts, state["optimizers"]):
            o.load_state_dict(s)
        _set_rng_state(state["rng"])
        start = state["step"]
    model = raw
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    fwd_model = torch.compile(model) if cfg.compile else model
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and d.device.type == "cuda")
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    n_params = sum(p.numel() for p in raw.parameters())
    log_rows = _read_log(out / LOG_FILE, start) if resume else []
    if d.main:
        save_json(cfg.to_dict(), out / CONFIG_FILE)
        atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in log_rows))
    logf = open(out / LOG_FILE, "a") if d.main else None

    def log(row: dict) -> None:
        log_rows.append(row)
        if logf:
            logf.write(json.dumps(row) + "\n")
            logf.flush()

    tokens_per_step = cfg.batch_size * cfg.seq_len
    step_times = [r["dt"] for r in log_rows if "dt" in r]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.variant}",
               disable=not (progress and d.main), dynamic_ncols=True)
    raw.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    step = start
    try:
        for step in bar:
            if step >= end:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            wd_on = step < cfg.wd_stop * cfg.steps
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = lr
                    g["weight_decay"] = g["base_wd"] if wd_on else 0.0
            starts = batch_indices(cfg, step, train_tok.size)[d.rank * per_rank:(d.rank + 1) * per_rank]
            micro = [starts[i:i + cfg.micro_batch] for i in range(0, per_rank, cfg.micro_batch)]
            loss_sum = 0.0
            for i, ms in enumerate(micro):
                xy = windows(train_tok, ms, cfg.seq_len).to(d.device)
                sync = i == len(micro) - 1 or d.world == 1
                ctx = model.no_sync() if (d.world > 1 and not sync) else nullcontext()
                with ctx:
                    with autocast:
                        loss = lm_loss(fwd_model, xy)
                    # NOTE: weight each micro-batch by its share of the global batch, so any split
                    # into ranks and micro-batches gives the same gradient (DDP then averages ranks).
                    (loss * (len(ms) / per_rank)).backward()
                loss_sum += loss.item() * len(ms)
            train_loss = all_sum([loss_sum], d)[0] / cfg.batch_size
            if not math.isfinite(train_loss):
                raise TernlmError(f"loss is {train_loss} at step {step}: stopped; the last good checkpoint "
                                  f"in {out / CKPT_DIR} is kept (lower --lr)")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            done = step + 1
            step_times.append(dt)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            row = {"step": done, "tokens": done * tokens_per_step, "loss": train_loss, "lr": lr, "dt": dt}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                row["val_loss"] = evaluate(fwd_model, val_tok, cfg, d, autocast)
                row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
            if done % cfg.log_every == 0 or "val_loss" in row or done == cfg.steps:
                log(row)
            if d.main and (done % cfg.save_every == 0 or done == cfg.steps):
                save_checkpoint(out, raw, opts, done, cfg)
            if d.world > 1:
                import torch.distributed as dist

                dist.barrier()
            step = done
    finally:
        bar.close()
        if logf:
            logf.close()
    if step < cfg.steps:
        return {"stopped_at": step}

    summary = None
    if d.main:
        summary = finish_run(raw, cfg, meta, log_rows, step_times, n_params, d.world)
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary or {}


def finish_run(raw: nn.Module, cfg: TrainConfig, meta: dict, rows: list[dict], step_times: list[float],
               n_params: int, world: int) -> dict:
    from ternlm.fileio import save_json
    from ternlm.nn.knowledge import save_model_with_knowledge

    out = Path(cfg.out).expanduser()
    tok = None
    tok_dir = Path(cfg.data).expanduser() / "tokenizer"
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    raw.eval()
    save_model_with_knowledge(raw.cpu(), tok, out / MODEL_DIR)
    if cfg.variant in VARIANT_ACT_BITS:  # what the model was trained to run as: ternlm quantize keeps it
        save_json({"variant": cfg.variant, "act_bits": VARIANT_ACT_BITS[cfg.variant]},
                  out / MODEL_DIR / TRAINING_FILE)
    evals = [r for r in rows if "val_loss" in r]
    steady = step_times[min(3, len(step_times) - 1):] if step_times else []
    summary = {
        "variant": cfg.variant, "label": VARIANTS[cfg.variant] + (f" + {cfg.knowledge_tokens} knowledge"
                                                                   if cfg.knowledge_tokens else ""),
        "config": cfg.to_dict(), "n_params": n_params, "world_size": world,
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "seconds_per_step": float(np.median(steady)) if steady else None,
        "linear_shapes": linear_shapes(raw), "model_shape": model_shape(raw),
        "vocab_size": meta["vocab_size"],
    }
    save_json(summary, out / SUMMARY_FILE)
    return summary


def linear_shapes(model: nn.Module) -> list[dict]:
    """(in, out, ternary?) of every linear layer, for memory and energy estimates."""
    from ternlm.nn.bitlinear import is_linear_like, linear_weight_out_in

    rows = []
    for n, m in model.named_modules():
        if type(m).__name__ == "BitLinear":
            rows.append({"name": n, "in": m.in_features, "out": m.out_features, "ternary": True})
        elif n and is_linear_like(m):
            o, i = linear_weight_out_in(m).shape
            rows.append({"name": n, "in": int(i), "out": int(o), "ternary": False})
    return rows


def model_shape(model: nn.Module) -> dict:
    c = model.config
    return {"model_type": c.model_type, "n_layer": c.num_hidden_layers, "d_model": c.hidden_size,
            "vocab_size": c.vocab_size, "tied": bool(getattr(c, "tie_word_embeddings", True)),
            "n_params_total": sum(p.numel() for p in model.parameters())}
