"""The canonical ternary quantizer (BitNet b1.58 absmean).

Every ternary path in ternlm -- QAT fake-quant, PTQ, packing, export -- calls ``ternarize``
and ``dequantize_ternary`` from here; there is no second implementation.

Weights use the ``nn.Linear`` layout ``(out_features, in_features)``. Scales are float32:

    per_tensor   scale shape ()
    per_channel  scale shape (out,)          one per output row
    per_group    scale shape (out, in // g)  one per g consecutive inputs of a row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError


@dataclass
class TernaryTensor:
    """Ternary codes in {-1, 0, +1} (int8) and the float32 scale(s) that dequantize them."""

    codes: torch.Tensor
    scale: torch.Tensor
    granularity: str = "per_tensor"
    group_size: int = 128

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ternary(self, dtype)


def _grouped(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """View ``w`` so that reducing over the last dim gives one value per scale.

    per_tensor -> (1, out*in); per_channel -> (out, in); per_group -> (out, in//g, g)
    """
    if w.dim() != 2:
        raise TernlmError(f"ternary quantization expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if granularity == "per_tensor":
        return w.reshape(1, -1)
    if granularity == "per_channel":
        return w
    if in_f % group_size:
        raise TernlmError(f"per_group quantization needs in_features ({in_f}) divisible by group_size ({group_size})")
    return w.reshape(out_f, in_f // group_size, group_size)


def _scale_shape(out_f: int, in_f: int, granularity: str, group_size: int) -> tuple:
    return {"per_tensor": (), "per_channel": (out_f,), "per_group": (out_f, in_f // max(group_size, 1))}[granularity]


def absmean_scale(w: torch.Tensor, cfg: TernaryConfig) -> torch.Tensor:
    """gamma = mean(|W|) over each scale's group (float32, clamped to eps)."""
    g = _grouped(w.detach().float().contiguous(), cfg.granularity, cfg.group_size)
    gamma = g.abs().mean(dim=-1).clamp_min(cfg.eps)
    return gamma.reshape(_scale_shape(*w.shape, cfg.granularity, cfg.group_size))


def ternarize(w: torch.Tensor, cfg: TernaryConfig | None = None) -> TernaryTensor:
    """Quantize a 2-D weight to ternary codes: RoundClip(W / gamma, -1, 1).

    NOTE: with ``scale_mode='absmean'`` (BitNet) re-quantizing a dequantized tensor returns the
    same codes but a scale multiplied by the share of non-zero codes; ``scale_mode='fit'`` is
    exactly idempotent (see TernaryConfig).
    """
    cfg = cfg or TernaryConfig()
    # NOTE: contiguous first, so a Conv1D's transposed view reduces in the same order as the
    # equivalent nn.Linear weight and gets bit-identical scales.
    wf = w.detach().float().contiguous()
    g = _grouped(wf, cfg.granularity, cfg.group_size)
    gamma = g.abs().mean(dim=-1, keepdim=True).clamp_min(cfg.eps)
    codes = torch.round(g / gamma).clamp_(-1, 1)
    if cfg.scale_mode == "fit":
        # NOTE: float64 sums keep a group of identical magnitudes exact, so fit is idempotent.
        nz = codes.abs().double()
        fitted = ((g.abs().double() * nz).sum(dim=-1, keepdim=True)
                  / nz.sum(dim=-1, keepdim=True).clamp_min(1)).float()
        scale = torch.where(nz.sum(dim=-1, keepdim=True) > 0, fitted, gamma)
    else:
        scale = gamma
    out_f, in_f = w.shape
    return TernaryTensor(
        codes=codes.to(torch.int8).reshape(out_f, in_f),
        scale=scale.reshape(_scale_shape(out_f, in_f, cfg.granularity, cfg.group_size)).contiguous(),
        granularity=cfg.granularity,
        group_size=cfg.group_size,
    )


def expand_scale(scale: torch.Tensor, shape: torch.Size, granularity: str, group_size: int) -> torch.Tensor:
    """Broadcast a stored scale to a full (out, in) tensor."""
    out_f, in_f = shape
    if granularity == "per_tensor":
        return scale.reshape(1, 1).expand(out_f, in_f)
    if granularity == "per_channel":
        return scale.reshape(out_f, 1).expand(out_f, in_f)
    return scale.reshape(out_f, in_f // group_size, 1).expand(out_f, in_f // group_size, group_size).reshape(out_f, in_f)


def dequantize_ternary(t: TernaryTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale, as a dense (out, in) tensor."""
    s = expand_scale(t.scale, t.codes.shape, t.granularity, t.group_size)
    return (t.codes.float() * s).to(dtype)


def fake_quantize_ternary(w: torch.Tensor, cfg: TernaryConfig | None = None) -> torch.Tensor:
    """dequantize(ternarize(w)) in w's dtype (no gradient; BitLinear adds the STE)."""
    return dequantize_ternary(ternarize(w, cfg), w.dtype)
