"""Fine-tuning a sequence classifier: full precision, or QAT when the model holds BitLinears."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ternlm.errors import TernlmError
from ternlm.train.common import Stepper, seed_everything


@dataclass
class ClassifierTrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0 and not self.max_steps:
            raise TernlmError("epochs must be > 0 (or set max_steps)")
        if self.lr <= 0 or self.batch_size < 1 or self.max_length < 2:
            raise TernlmError("lr must be > 0, batch_size >= 1 and max_length >= 2")

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(enc: dict, labels: torch.Tensor, batch_size: int, gen: torch.Generator, pad_id: int):
    order = torch.randperm(len(labels), generator=gen)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size].tolist()
        seqs = [enc["input_ids"][j] for j in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # right padding: HF finds the last real token via pad_token_id
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        yield ids, mask, labels[idx]


def train_classifier(model: nn.Module, tokenizer, texts: list[str], labels: list[int],
                     cfg: ClassifierTrainConfig, *, progress: bool = True, desc: str = "train") -> dict:
    """Train in place; returns the history (loss per step, lr, quantization lambda)."""
    if not texts:
        raise TernlmError("no training examples")
    seed_everything(cfg.seed)
    enc = tokenizer(list(texts), truncation=True, max_length=cfg.max_length)
    y = torch.tensor(labels, dtype=torch.long)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    stepper = Stepper(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total=total,
                      warmup=max(1, int(cfg.warmup_ratio * total)), grad_clip=cfg.grad_clip)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)
    while step < total:
        for ids, mask, yb in _batches(enc, y, cfg.batch_size, gen, tokenizer.pad_token_id):
            if step >= total:
                break
            loss = stepper.step(step, input_ids=ids, attention_mask=mask, labels=yb)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    return stepper.finish()
