"""Pieces shared by the classification and language-model trainers."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn as nn

from ternlm.errors import TernlmError
from ternlm.nn.surgery import bit_linears, project_to_ternary_


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # no decay on biases, norms and embeddings' 1-D params (the usual GPT recipe)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95) if weight_decay else (0.9, 0.999))


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class QATHooks:
    """Lambda warm-up and post-step projection for every BitLinear in the model."""

    def __init__(self, model: nn.Module):
        self.layers = bit_linears(model)
        self.warmup = max((m.config.lambda_warmup_steps for m in self.layers), default=0)
        self.project = any(m.config.project_after_step for m in self.layers)

    def before_step(self, step: int) -> float:
        lam = 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)
        for m in self.layers:
            m.quant_lambda = lam
        return lam

    def after_step(self, model: nn.Module) -> None:
        if self.project:
            project_to_ternary_(model)

    def finish(self) -> None:
        for m in self.layers:
            m.quant_lambda = 1.0


def check_loss(loss: torch.Tensor, step: int) -> float:
    v = loss.item()
    if not math.isfinite(v):
        raise TernlmError(f"training diverged: loss is {v} at step {step} (lower the learning rate)")
    return v


class Stepper:
    """One optimizer step at a time with the shared recipe: lr schedule, QAT hooks, NaN check,
    gradient clipping, history."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, total: int, warmup: int,
                 grad_clip: float):
        self.model, self.base_lr, self.total, self.warmup, self.grad_clip = model, lr, total, warmup, grad_clip
        self.opt = make_optimizer(model, lr, weight_decay)
        self.hooks = QATHooks(model)
        self.hist = {"step": [], "loss": [], "lr": [], "quant_lambda": []}
        model.train()

    def step(self, step: int, **batch) -> float:
        lr = lr_at(step, self.total, self.warmup, self.base_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        lam = self.hooks.before_step(step)
        out = self.model(**batch)
        loss = check_loss(out.loss, step)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.hooks.after_step(self.model)
        for k, v in (("step", step), ("loss", loss), ("lr", lr), ("quant_lambda", lam)):
            self.hist[k].append(v)
        return loss

    def finish(self) -> dict:
        self.hooks.finish()
        self.model.eval()
        return self.hist
