"""Pre-train a small GPT-2-architecture LM from scratch on local text (offline stand-in for
pretrained GPT-2 weights), saved as a Hugging Face directory with the tokenizer."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ternlm.errors import TernlmError
from ternlm.train.lm import LMTrainConfig


@dataclass
class PretrainConfig:
    config: str = "gpt2"          # HF config source (hub id or dir with config.json + tokenizer)
    texts: tuple = ()             # local files / dirs / hub ids, concatenated
    out: str = "runs/gpt2-mini"
    n_layer: int | None = 4       # None keeps the config's value
    n_embd: int | None = 256
    n_head: int | None = 4
    n_positions: int | None = 256
    train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(steps=400, batch_size=8, block_size=128,
                                                                       lr=2e-3, warmup_steps=40))
    progress: bool = True

    def __post_init__(self):
        self.texts = tuple(self.texts)
        if not self.texts:
            raise TernlmError("pretrain needs at least one training text (--text FILE)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["texts"] = list(self.texts)
        return d


def pretrain(cfg: PretrainConfig) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ternlm.data.text import load_text
    from ternlm.models.loading import load_tokenizer, save_model
    from ternlm.fileio import save_json
    from ternlm.train.common import seed_everything
    from ternlm.train.lm import train_lm

    tok = load_tokenizer(cfg.config)
    try:
        hf_cfg = AutoConfig.from_pretrained(cfg.config)
    except Exception as e:  # hub offline, missing dir, bad json
        raise TernlmError(f"could not load a model config from {cfg.config!r}: {str(e).splitlines()[0][:160]}") from None
    overrides = {k: v for k, v in (("n_layer", cfg.n_layer), ("n_embd", cfg.n_embd), ("n_head", cfg.n_head),
                                   ("n_positions", cfg.n_positions)) if v is not None}
    for k, v in overrides.items():
        if not hasattr(hf_cfg, k):
            raise TernlmError(f"{type(hf_cfg).__name__} has no {k}; pretrain sizes apply to GPT-2-style configs")
        setattr(hf_cfg, k, v)
    if cfg.train.block_size > getattr(hf_cfg, "n_positions", cfg.train.block_size):
        raise TernlmError(f"block_size {cfg.train.block_size} exceeds n_positions {hf_cfg.n_positions}")
    text = "\n\n".join(load_text(t, split="train") for t in cfg.texts)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    seed_everything(cfg.train.seed)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.progress:
        print(f"[ternlm] pre-training {type(model).__name__} ({n_params:,} params) on {ids.numel():,} tokens", flush=True)
    t0 = time.perf_counter()
    hist = train_lm(model, ids, cfg.train, progress=cfg.progress)
    secs = time.perf_counter() - t0
    out = save_model(model, tok, cfg.out)
    log = {"config": cfg.to_dict(), "n_params": n_params, "n_tokens": ids.numel(), "seconds": secs,
           "seconds_per_step": secs / cfg.train.steps, "final_loss": sum(hist["loss"][-20:]) / len(hist["loss"][-20:]),
           "history": hist}
    save_json(log, Path(out) / "ternlm_pretrain.json")
    return log
