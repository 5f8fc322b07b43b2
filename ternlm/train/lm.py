"""Causal language-model training on a token stream (nanoGPT-style random windows).

Used to pre-train small GPT-2-architecture models offline and for LM QAT (the model may hold
BitLinears; the same QAT hooks apply).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ternlm.errors import TernlmError
from ternlm.train.common import Stepper, seed_everything


@dataclass
class LMTrainConfig:
    steps: int = 600
    batch_size: int = 16
    block_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.block_size < 2 or self.lr <= 0:
            raise TernlmError("steps, batch_size >= 1, block_size >= 2 and lr > 0 are required")

    def to_dict(self) -> dict:
        return asdict(self)


def train_lm(model: nn.Module, tokens: torch.Tensor, cfg: LMTrainConfig, *, progress: bool = True,
             desc: str = "pretrain") -> dict:
    """Train in place on random (batch, block_size) windows of ``tokens`` (1-D LongTensor)."""
    n = tokens.numel()
    if n < cfg.block_size + 2:
        raise TernlmError(f"text too short: {n} tokens for block_size {cfg.block_size}")
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    stepper = Stepper(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total=cfg.steps,
                      warmup=cfg.warmup_steps, grad_clip=cfg.grad_clip)
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        ix = torch.randint(0, n - cfg.block_size - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([tokens[i:i + cfg.block_size] for i in ix.tolist()])  # (B, T)
        loss = stepper.step(step, input_ids=x, labels=x)  # HF shifts labels internally
        bar.set_postfix(loss=f"{loss:.3f}")
    return stepper.finish()
