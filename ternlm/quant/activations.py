"""Per-token absmax activation quantizers (int8 and int4), as in BitNet b1.58's W1.58A8."""

from __future__ import annotations

import torch

from ternlm.config import QMAX
from ternlm.errors import TernlmError
from ternlm.quant.int8 import absmax_quantize

ACT_EPS = 1e-5  # the smallest absmax a token is scaled by (all-zero tokens quantize to 0)


def quantize_activations(x: torch.Tensor, bits: int = 8, eps: float = ACT_EPS):
    """Quantize each token (last dim) to signed ``bits`` integers with its own absmax scale.

    Returns ``(q, scale)`` with q int8 in [-Qmax, Qmax] and scale float32 of shape (..., 1),
    so that x ~= q * scale.
    """
    if bits not in QMAX:
        raise TernlmError(f"activation bits must be 8 or 4, got {bits}")
    return absmax_quantize(x, QMAX[bits], dim=-1, eps=eps)


def fake_quantize_activations(x: torch.Tensor, bits: int = 8, eps: float = ACT_EPS) -> torch.Tensor:
    """quantize + dequantize in x's dtype (no gradient handling; callers add the STE)."""
    q, scale = quantize_activations(x, bits, eps)
    return (q.float() * scale).to(x.dtype)
