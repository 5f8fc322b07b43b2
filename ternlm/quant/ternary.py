"""The canonical ternary quantizer (BitNet b1.58 absmean).

Every ternary path in ternlm -- QAT fake-quant, PTQ, packing, export -- calls ``ternarize``
and ``dequantize_ternary`` from here; there is no second implementation.

Weights use the ``nn.Linear`` layout ``(out_features, in_features)``. Scales are float32:

    per_tensor   scale shape ()
    per_channel  scale shape (out,)          one per output row
    per_group    scale shape (out, ceil(in / g))  one per g consecutive inputs of a row; when g
                 does not divide in, the last group of each row is partial (in % g inputs)
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


def n_groups(in_features: int, group_size: int) -> int:
    """Groups of a row: ceil(in_features / group_size), the last one possibly partial."""
    if group_size < 1:
        raise TernlmError(f"group_size must be >= 1, got {group_size}")
    return -(-in_features // group_size)


def _grouped(w: torch.Tensor, granularity: str, group_size: int) -> list[torch.Tensor]:
    """Views of ``w`` such that reducing each over its last dim gives one value per scale.

    per_tensor -> [(1, out*in)]; per_channel -> [(out, in)]; per_group -> [(out, in//g, g)] plus,
    when g does not divide in, [(out, 1, in % g)] for the partial last group of every row.
    """
    if w.dim() != 2:
        raise TernlmError(f"ternary quantization expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if granularity == "per_tensor":
        return [w.reshape(1, -1)]
    if granularity == "per_channel":
        return [w]
    n_groups(in_f, group_size)  # validates group_size
    full = in_f // group_size * group_size
    parts = [w[:, :full].reshape(out_f, in_f // group_size, group_size)] if full else []
    if full < in_f:
        parts.append(w[:, full:].reshape(out_f, 1, in_f - full))
    return parts


def scale_shape(out_f: int, in_f: int, granularity: str, group_size: int) -> tuple:
    if granularity == "per_group":
        return (out_f, n_groups(in_f, group_size))
    return {"per_tensor": (), "per_channel": (out_f,)}[granularity]


def absmean_scale(w: torch.Tensor, cfg: TernaryConfig) -> torch.Tensor:
    """gamma = mean(|W|) over each scale's group (float32, clamped to eps)."""
    parts = _grouped(w.detach().float().contiguous(), cfg.granularity, cfg.group_size)
    gamma = torch.cat([g.abs().mean(dim=-1).clamp_min(cfg.eps).reshape(g.shape[0], -1) for g in parts], 1)
    return gamma.reshape(scale_shape(*w.shape, cfg.granularity, cfg.group_size))


def _ternarize_part(g: torch.Tensor, cfg: TernaryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (same shape as g) and scales (g reduced over its last dim, keepdim) of one view."""
    gamma = g.abs().mean(dim=-1, keepdim=True).clamp_min(cfg.eps)
    codes = (g / gamma).round_().clamp_(-1, 1)
    if cfg.scale_mode == "fit":
        # NOTE: float64 sums keep a group of identical magnitudes exact, so fit is idempotent.
        nz = codes.abs().double()
        fitted = ((g.abs().double() * nz).sum(dim=-1, keepdim=True)
                  / nz.sum(dim=-1, keepdim=True).clamp_min(1)).float()
        return codes, torch.where(nz.sum(dim=-1, keepdim=True) > 0, fitted, gamma)
    return codes, gamma


def ternarize(w: torch.Tensor, cfg: TernaryConfig | None = None) -> TernaryTensor:
    """Quantize a 2-D weight to ternary codes: RoundClip(W / gamma, -1, 1).

    NOTE: with ``scale_mode='absmean'`` (BitNet) re-quantizing a dequantized tensor returns the
    same codes but a scale multiplied by the share of non-zero codes; ``scale_mode='fit'`` is
    exactly idempotent (see TernaryConfig).
    NOTE: a partial last group (per_group, g not dividing in_features) is quantized on its own
    in_features % g weights, exactly as a full group would be (its mean is over those weights only).
    """
    cfg = cfg or TernaryConfig()
    # NOTE: contiguous first, so a Conv1D's transposed view reduces in the same order as the
    # equivalent nn.Linear weight and gets bit-identical scales.
    wf = w.detach().float().contiguous()
    out_f, in_f = w.shape if w.dim() == 2 else (None, None)
    # NOTE: each part's codes go to int8 as soon as they exist: only one float temporary of the
    # weight's size is alive at a time (streaming quantization's peak is this function's).
    parts = [(c.to(torch.int8), s) for c, s in
             (_ternarize_part(g, cfg) for g in _grouped(wf, cfg.granularity, cfg.group_size))]
    codes = torch.cat([c.reshape(out_f if cfg.granularity != "per_tensor" else 1, -1) for c, _ in parts], 1)
    scale = torch.cat([s.reshape(s.shape[0], -1) for _, s in parts], 1)
    return TernaryTensor(
        codes=codes.reshape(out_f, in_f),
        scale=scale.reshape(scale_shape(out_f, in_f, cfg.granularity, cfg.group_size)).contiguous(),
        granularity=cfg.granularity,
        group_size=cfg.group_size,
    )


def expand_scale(scale: torch.Tensor, shape: torch.Size, granularity: str, group_size: int) -> torch.Tensor:
    """Broadcast a stored scale to a full (out, in) tensor (a partial last group included)."""
    out_f, in_f = shape
    if granularity == "per_tensor":
        return scale.reshape(1, 1).expand(out_f, in_f)
    if granularity == "per_channel":
        return scale.reshape(out_f, 1).expand(out_f, in_f)
    groups = n_groups(in_f, group_size)
    if tuple(scale.shape) != (out_f, groups):
        raise TernlmError(f"per_group scale must have shape ({out_f}, {groups}) for in_features={in_f} and "
                          f"group_size={group_size}, got {tuple(scale.shape)}")
    return scale.repeat_interleave(group_size, dim=1)[:, :in_f]


def dequantize_ternary(t: TernaryTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale, as a dense (out, in) tensor."""
    s = expand_scale(t.scale, t.codes.shape, t.granularity, t.group_size)
    return (t.codes.float() * s).to(dtype)


def fake_quantize_ternary(w: torch.Tensor, cfg: TernaryConfig | None = None) -> torch.Tensor:
    """dequantize(ternarize(w)) in w's dtype (no gradient; BitLinear adds the STE)."""
    return dequantize_ternary(ternarize(w, cfg), w.dtype)
