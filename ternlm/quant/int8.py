"""Classic 8-bit weight quantizers: symmetric absmax and asymmetric zero-point.

Layout as in ``ternary.py``: weights (out, in); per_tensor scale shape (), per_channel (out,).
``absmax_quantize`` is the one symmetric absmax quantizer: int8 weights (here), LLM.int8()'s
weights and activations, and per-token int8/int4 activations (``ternlm.quant.activations``) all
call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ternlm.config import Int8Config
from ternlm.errors import TernlmError

_EPS = 1e-12


def absmax_quantize(x: torch.Tensor, qmax: float = 127.0, dim: int | None = -1, eps: float = 127.0 * _EPS):
    """Symmetric absmax quantization along ``dim`` (None: the whole tensor).

    Returns ``(q, scale)``: q int8 in [-qmax, qmax], scale float32 with ``dim`` kept (a 0-d scale for
    ``dim=None``), so that x ~= q * scale.

    NOTE on numerics: scale = max(amax, eps) / qmax and q = round(x / scale), in float32, in this
    order; the compiled activation quantizer reproduces exactly these operations (bitwise tests).
    """
    xf = x.detach().float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    # qmax as a tensor: a CUDA tensor divided by a Python number is multiplied by its reciprocal
    # (not the same float32 as the division for qmax = 127 or 7), a tensor by a tensor is divided
    # exactly, as on the CPU -- so the scale, and every kernel checked against it, is the same on both
    scale = amax.clamp_min(eps) / torch.full_like(amax, qmax)
    q = torch.round(xf / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


@dataclass
class Int8Tensor:
    q: torch.Tensor                     # int8 (out, in)
    scale: torch.Tensor                 # float32 () or (out,)
    zero_point: Optional[torch.Tensor]  # int32 like scale, None for absmax
    scheme: str = "absmax"
    granularity: str = "per_channel"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self, dtype)


def _reduce(w: torch.Tensor, granularity: str, fn) -> torch.Tensor:
    if granularity == "per_tensor":
        return fn(w.reshape(-1), 0)
    return fn(w, 1)


def _col(t: torch.Tensor) -> torch.Tensor:
    # () stays scalar; (out,) -> (out, 1) to broadcast over a row
    return t if t.dim() == 0 else t.unsqueeze(1)


def quantize_int8(w: torch.Tensor, cfg: Int8Config | None = None) -> Int8Tensor:
    cfg = cfg or Int8Config()
    if w.dim() != 2:
        raise TernlmError(f"int8 quantization expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    wf = w.detach().float()
    if cfg.scheme == "absmax":
        q, scale = absmax_quantize(wf, 127.0, dim=None if cfg.granularity == "per_tensor" else 1)
        return Int8Tensor(q, scale.reshape(-1) if scale.dim() else scale, None, "absmax", cfg.granularity)
    # Zero-point: map [min, max] (widened to contain 0, so 0 is exact) onto [-128, 127].
    lo = _reduce(wf, cfg.granularity, lambda t, d: t.amin(dim=d)).clamp(max=0)
    hi = _reduce(wf, cfg.granularity, lambda t, d: t.amax(dim=d)).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp_min(_EPS)
    zp = torch.round(-128.0 - lo / scale).clamp(-128, 127)
    q = (torch.round(wf / _col(scale)) + _col(zp)).clamp_(-128, 127)
    return Int8Tensor(q.to(torch.int8), scale, zp.to(torch.int32), "zeropoint", cfg.granularity)


def dequantize_int8(t: Int8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = t.q.float()
    if t.zero_point is not None:
        q = q - _col(t.zero_point.float())
    return (q * _col(t.scale)).to(dtype)
