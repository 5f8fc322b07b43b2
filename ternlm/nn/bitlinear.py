"""BitLinear: a training-time ternary linear layer over latent full-precision weights.

Forward quantizes the latent weights with the canonical absmean quantizer (and optionally the
activations per token) and passes gradients straight through to the latent weights (STE).

Two scale modes:

    scale is None (default, QAT)   the scale is recomputed from the latent weights every forward
                                   (absmean, ``config.scale_mode``), exactly as the packer would.
    learned scale (distillation)   ``BitLinear.from_ternary`` starts from a packed layer's codes and
                                   calibrated scales: latent W = codes * s, ``scale`` an nn.Parameter
                                   of the stored scale shape (per tensor / channel / group, partial last
                                   group included). Forward: codes = RoundClip(W / s, -1, 1) with the
                                   learned s, weight = codes * s. Gradients: W gets the identity (STE,
                                   as in BitNet), s gets d(codes * s)/ds = codes with the codes held
                                   fixed (LSQ's scale gradient; its W/s - round(W/s) term vanishes at
                                   the start, where W = codes * s). So the first forward reproduces the
                                   packed layer exactly, and ``ternary()`` packs back with the learned s.

It is a drop-in for ``nn.Linear`` and for Hugging Face GPT-2's ``Conv1D``. The weight is kept in
the layout of the module it replaced -- (out, in) for Linear, (in, out) for Conv1D -- so state dicts
stay loadable by the original architecture; the one transpose happens in ``_weight_out_in``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.quant.activations import fake_quantize_activations
from ternlm.quant.ste import ste
from ternlm.quant.ternary import TernaryTensor, scale_shape, dequantize_ternary, expand_scale, ternarize


def conv1d_class():
    """transformers' GPT-2 Conv1D, or None when transformers is not importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_linear_like(m: nn.Module) -> bool:
    c = conv1d_class()
    return isinstance(m, nn.Linear) or (c is not None and isinstance(m, c))


def linear_weight_out_in(m: nn.Module) -> torch.Tensor:
    """The (out, in) view of an nn.Linear or Conv1D weight."""
    c = conv1d_class()
    return m.weight.t() if c is not None and isinstance(m, c) else m.weight


class BitLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: TernaryConfig | None = None, transposed: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config or TernaryConfig()
        self.transposed = transposed  # True: weight stored (in, out) like Conv1D
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        # None: absmean scale recomputed every forward; a Parameter: learned scale (from_ternary).
        self.register_parameter("scale", None)
        # 1.0 = fully quantized forward; < 1 during lambda warm-up (set by the trainer).
        self.quant_lambda = 1.0 if self.config.lambda_warmup_steps == 0 else 0.0

    @classmethod
    def from_module(cls, m: nn.Module, config: TernaryConfig | None = None) -> "BitLinear":
        c = conv1d_class()
        if isinstance(m, nn.Linear):
            new = cls(m.in_features, m.out_features, m.bias is not None, config, transposed=False,
                      device=m.weight.device, dtype=m.weight.dtype)
        elif c is not None and isinstance(m, c):
            in_f, out_f = m.weight.shape
            new = cls(in_f, out_f, m.bias is not None, config, transposed=True,
                      device=m.weight.device, dtype=m.weight.dtype)
        else:
            raise TypeError(f"BitLinear replaces nn.Linear or Conv1D, not {type(m).__name__}")
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        return new

    @classmethod
    def from_ternary(cls, t: TernaryTensor, bias: torch.Tensor | None = None,
                     config: TernaryConfig | None = None) -> "BitLinear":
        """A learned-scale BitLinear (out, in) starting exactly at ``t``: latent W = codes * scale,
        ``scale`` a trainable copy of ``t.scale``. ``config`` supplies act_bits / eps / warm-up; its
        granularity and group size are taken from ``t``."""
        from dataclasses import replace

        out_f, in_f = t.codes.shape
        cfg = replace(config or TernaryConfig(), granularity=t.granularity, group_size=t.group_size)
        want = scale_shape(out_f, in_f, t.granularity, t.group_size)
        if tuple(t.scale.shape) != tuple(want):
            raise TernlmError(f"scale shape {tuple(t.scale.shape)} does not match {t.granularity} "
                              f"(group {t.group_size}) for a ({out_f}, {in_f}) weight; expected {want}")
        new = cls(in_f, out_f, bias is not None, cfg, transposed=False)
        with torch.no_grad():
            new.weight.copy_(dequantize_ternary(t, torch.float32))
            if bias is not None:
                new.bias.copy_(bias.float())
        new.scale = nn.Parameter(t.scale.detach().float().clone().contiguous())
        return new

    @property
    def learned_scale(self) -> bool:
        return isinstance(self.scale, torch.Tensor)

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.t() if self.transposed else self.weight

    def _expanded_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The learned scale clamped to eps and broadcast to (out, in); differentiable in ``scale``."""
        s = self.scale.clamp_min(self.config.eps)
        return expand_scale(s, w.shape, self.config.granularity, self.config.group_size)

    def ternary(self) -> TernaryTensor:
        """Codes and scale of the current latent weights (with the learned scale when there is one)."""
        w = self._weight_out_in()
        if not self.learned_scale:
            return ternarize(w, self.config)
        with torch.no_grad():
            s = self._expanded_scale(w).float()
            codes = torch.round(w.detach().float() / s).clamp_(-1, 1).to(torch.int8)
            scale = self.scale.detach().float().clamp_min(self.config.eps).contiguous()
        return TernaryTensor(codes, scale, self.config.granularity, self.config.group_size)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the forward pass multiplies by, with the STE attached."""
        w = self._weight_out_in()
        if self.learned_scale:
            s = self._expanded_scale(w).to(w.dtype)
            codes = torch.round(w.detach() / s.detach()).clamp_(-1, 1)
            # NOTE: value codes * s; d/ds = codes (codes held fixed), d/dW = identity (STE).
            wq = codes * s
            lam = self.quant_lambda
            if lam >= 1.0:
                return wq + (w - w.detach())
            return w + lam * (wq - w.detach())  # warm-up blend; d/dW = 1, d/ds = lam * codes
        wq = dequantize_ternary(self.ternary(), w.dtype)
        lam = self.quant_lambda
        if lam >= 1.0:
            return ste(w, wq)
        # NOTE: warm-up blend (1 - lam) * w + lam * q; gradient still identity w.r.t. w.
        return w + lam * (wq - w).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.act_bits is not None:
            x = ste(x, fake_quantize_activations(x, self.config.act_bits))
        if self.learned_scale and self.quant_lambda >= 1.0 and torch.is_grad_enabled():
            c = self.config
            return _LearnedScaleLinear.apply(x, self._weight_out_in(), self.scale, self.bias, c.granularity,
                                             c.group_size, c.eps)
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def project_(self) -> None:
        """Overwrite the latent weights with their ternary projection (codes * scale)."""
        wq = dequantize_ternary(self.ternary(), self.weight.dtype)
        self.weight.copy_(wq.t() if self.transposed else wq)

    def extra_repr(self) -> str:
        c = self.config
        a = f"A{c.act_bits}" if c.act_bits else "A16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, W1.58{a}, {c.granularity}, transposed={self.transposed}"
                + (", learned scale" if self.learned_scale else ""))


class _LearnedScaleLinear(torch.autograd.Function):
    """``F.linear(x, effective_weight(), bias)`` for a learned-scale BitLinear at full quantization,
    with the gradients autograd gives that expression, but saving only x, the int8 codes and the
    scale: the (out, in) float weight is recomputed in the backward pass instead of being held from
    forward to backward for every layer (several float copies of the model during training).

    Gradients (codes held fixed): dL/dx = g @ (codes * s); dL/dW = g^T x (straight-through);
    dL/ds = the group sums of (g^T x) * codes, through the same clamp and broadcast as the forward."""

    @staticmethod
    def forward(ctx, x, w, scale, bias, granularity, group_size, eps):
        s = expand_scale(scale.clamp_min(eps), w.shape, granularity, group_size).to(w.dtype)
        codes = torch.round(w / s).clamp_(-1, 1)
        y = F.linear(x, codes * s, bias)
        ctx.save_for_backward(x, codes.to(torch.int8), scale)
        ctx.conf = (granularity, group_size, eps, w.dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, codes, scale = ctx.saved_tensors
        granularity, group_size, eps, dtype, has_bias = ctx.conf
        with torch.enable_grad():
            sp = scale.detach().requires_grad_(True)
            s = expand_scale(sp.clamp_min(eps), codes.shape, granularity, group_size).to(dtype)
        c = codes.to(dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = (g2 @ (c * s.detach())).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x2
        gs = torch.autograd.grad(s, sp, gw * c)[0] if ctx.needs_input_grad[2] else None
        gb = g2.sum(0) if has_bias and ctx.needs_input_grad[3] else None
        return gx, (gw if ctx.needs_input_grad[1] else None), gs, gb, None, None, None
