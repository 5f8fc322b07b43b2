"""Fake-quantized ternary layers for calibration, and stage 2's block output reconstruction.

``FakeTernaryLinear`` computes with codes * expanded group scales in float -- the same numbers a
packed ``TernaryLinear`` holds -- with the scales stored as logs so they stay positive while
Adam moves them. ``reconstruct_block`` fixes the codes and optimises the block's continuous
parameters (log scales, norm weights, biases) so that the quantized block, fed the quantized
stream, reproduces the full-precision block's output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.quant.activations import fake_quantize_activations
from ternlm.quant.ternary import TernaryTensor
from ternlm.ptq.calibration import run_block
from ternlm.ptq.rounding import expand_groups


class FakeTernaryLinear(nn.Module):
    """y = x (codes * scale)^T + b in float; x (..., in) -> (..., out)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                 act_bits: int | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.act_bits = act_bits
        self.register_buffer("codes", codes.float().contiguous())
        self.log_scale = nn.Parameter(scale.float().clamp_min(1e-12).log())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def weight_q(self) -> torch.Tensor:
        return self.codes * expand_groups(self.scale(), self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            # straight-through: forward sees int8-rounded activations, gradient passes through
            x = x + (fake_quantize_activations(x.detach(), self.act_bits) - x).detach()
        return F.linear(x, self.weight_q(), self.bias)

    def ternary(self) -> TernaryTensor:
        return TernaryTensor(self.codes.to(torch.int8), self.scale().detach().float().contiguous(),
                             "per_group", self.group_size)


def block_params(block: nn.Module) -> tuple[list, list, list]:
    """(log scales, norm weights, biases) of a block holding FakeTernaryLinear layers."""
    scales, norms, biases = [], [], []
    for m in block.modules():
        if isinstance(m, FakeTernaryLinear):
            scales.append(m.log_scale)
            if m.bias is not None:
                biases.append(m.bias)
        elif "norm" in type(m).__name__.lower():
            if getattr(m, "weight", None) is not None:
                norms.append(m.weight)
            if getattr(m, "bias", None) is not None:
                biases.append(m.bias)
    return scales, norms, biases


@torch.no_grad()
def block_loss(block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict, batch: int) -> tuple[float, torch.Tensor]:
    """Mean squared error of block(x) against y over all sequences, and block(x)."""
    out = torch.cat([run_block(block, x[i:i + batch], kwargs) for i in range(0, x.shape[0], batch)], 0)
    return float(F.mse_loss(out, y)), out


def reconstruct_block(block: nn.Module, x_q: torch.Tensor, y_fp: torch.Tensor, kwargs: dict, *, steps: int,
                      lr: float, batch: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Adam on the block's continuous parameters; loss = MSE(block(x_q), y_fp) over a random
    batch of calibration sequences per step. Returns ({loss_before, loss_after} on all sequences, block(x_q));
    keeps the parameters of whichever is lower (so reconstruction never makes a block worse on
    its calibration data)."""
    scales, norms, biases = block_params(block)
    params = scales + norms + biases
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": scales, "lr": lr}]
    if norms:
        groups.append({"params": norms, "lr": lr * float(torch.cat([n.detach().abs().flatten() for n in norms]).mean())})
    if biases:
        groups.append({"params": biases, "lr": lr * 0.1})

    before, out = block_loss(block, x_q, y_fp, kwargs, batch)
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(groups)
    n = x_q.shape[0]
    for _ in range(steps):
        idx = torch.randperm(n, generator=generator)[:batch]
        loss = F.mse_loss(run_block(block, x_q[idx], kwargs), y_fp[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    after, out_after = block_loss(block, x_q, y_fp, kwargs, batch)
    if after > before:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        after, out_after = before, out
    return {"loss_before": before, "loss_after": after}, out_after
