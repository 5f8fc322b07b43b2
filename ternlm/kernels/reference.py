"""Pure-PyTorch twins of the compiled kernels: the same math, written to be read.

These are the ground truth the C kernels are tested against and the fallback when the extension
is unavailable. All take 2-D float activations ``x`` (M, in_features) and a packed weight
(out_features, row_bytes) in one of the formats of ``ternlm.quant.pack``, and return float32
(M, out_features).

Scales follow ``ternlm.quant.ternary``: a 0-d scale is per tensor, (out,) per channel and
(out, ceil(in / g)) per group (the last group of a row may be partial). Per-group calls take
``group_size``; without it the group size is in_features / groups, which must then divide.

NOTE on numerics (W1.58A8): activations go through the canonical per-token absmax quantizer
(``ternlm.quant.activations.quantize_activations``), the integer dot products are exact, and the
result is ``(acc * act_scale) * weight_scale (+ bias)`` in float32 -- the compiled kernel performs
the very same float operations in the same order, so for per-tensor/per-channel scales the two
produce bitwise-equal outputs.

NOTE on numerics (W1.58A8, per-group scales), the order the compiled and Triton kernels follow:
acc[g] is the exact int32 sum over group g of a row; then, in float32, left to right, no FMA:

    y = 0;  for g in 0..G-1:  y = y + float(acc[g]) * scale[n, g]
    out = y * act_scale (+ bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ternlm.errors import TernlmError
from ternlm.quant.activations import quantize_activations
from ternlm.quant.pack import unpack
from ternlm.quant.ternary import expand_scale, n_groups


def granularity_of(scale: torch.Tensor) -> str:
    return {0: "per_tensor", 1: "per_channel", 2: "per_group"}[scale.dim()]


def group_size_of(scale: torch.Tensor, in_features: int, group_size: int | None = None) -> int | None:
    """The group size of an (out, G) scale (None for per-tensor/per-channel scales), checked
    against in_features: G must be ceil(in_features / group_size)."""
    if scale.dim() < 2:
        return None
    groups = scale.shape[1]
    if group_size is None:
        if groups < 1 or in_features % groups:
            raise TernlmError(f"per-group scale with {groups} groups over in_features={in_features}: "
                              "pass group_size (the last group may be partial)")
        group_size = in_features // groups
    if group_size < 1 or n_groups(in_features, group_size) != groups:
        raise TernlmError(f"per-group scale has {groups} groups; in_features={in_features} in groups of "
                          f"{group_size} needs {n_groups(in_features, max(group_size, 1))}")
    return group_size


def a8_accumulators(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 sum_k q[m, k] * codes[n, k]: (M, K) int8 x (N, K) int8 -> (M, N) int32.

    NOTE: every partial sum is an integer of magnitude <= 127 * K, so a float32 matmul is exact
    (whatever its summation order) while 127 * K < 2**24, i.e. K < 132k; beyond that float64 is.
    Either is far faster than an integer matmul on CPU.
    """
    dtype = torch.float32 if 127 * q.shape[-1] < 2**24 else torch.float64
    return (q.to(dtype) @ codes.to(dtype).t()).to(torch.int32)


def linear_a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
              fmt: str = "2bit", act_bits: int = 8, bias: torch.Tensor | None = None,
              group_size: int | None = None) -> torch.Tensor:
    """W1.58A8 (or A4): per-token absmax int activations x ternary codes, int32 accumulation."""
    out_f = packed.shape[0]
    codes = unpack(packed, (out_f, in_features), fmt)
    q, s = quantize_activations(x, act_bits)  # (M, K) int8, (M, 1) float32
    g = group_size_of(scale, in_features, group_size)
    if g is None:
        y = a8_accumulators(q, codes).float() * s * scale.float()
    else:
        y = _linear_a8_groups(q, s, codes, scale.float(), g)
    return y if bias is None else y + bias.float()


def _linear_a8_groups(q, s, codes, scale, g):
    """Per group: one exact accumulator per (token, row, group), folded in the NOTE's order."""
    M, K = q.shape
    N, G = scale.shape
    pad = G * g - K  # the partial last group, zero-padded: zeros add nothing to an exact sum
    qg = F.pad(q, (0, pad)).reshape(M, G, g).transpose(0, 1)  # (G, M, g)
    cg = F.pad(codes, (0, pad)).reshape(N, G, g).transpose(0, 1)  # (G, N, g)
    dtype = torch.float32 if 127 * g < 2**24 else torch.float64
    acc = torch.bmm(qg.to(dtype), cg.to(dtype).transpose(1, 2)).float()  # (G, M, N), exact integers
    y = acc.new_zeros(M, N)
    for i in range(G):
        y = y + acc[i] * scale[:, i]
    return y * s


def dequantize(packed: torch.Tensor, scale: torch.Tensor, in_features: int, fmt: str = "2bit",
               dtype: torch.dtype = torch.float32, group_size: int | None = None) -> torch.Tensor:
    """Dense (out, in) weight codes * scale."""
    out_f = packed.shape[0]
    codes = unpack(packed, (out_f, in_features), fmt)
    g = group_size_of(scale, in_features, group_size)
    s = expand_scale(scale.float(), codes.shape, granularity_of(scale), g or 1)
    return (codes.float() * s).to(dtype)


def linear_a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
               fmt: str = "2bit", bias: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """W1.58A16: float activations times the dequantized ternary weight."""
    return F.linear(x.float(), dequantize(packed, scale, in_features, fmt, group_size=group_size),
                    None if bias is None else bias.float())


def int8_linear_a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, in_features: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: per-token absmax int8 activations x int8 rows (N, >= in_features; padding ignored).

    NOTE: like the ternary A8 path, (acc * act_scale) * w_scale (+ bias) in float32 from an exact
    int32 accumulator, so the compiled kernel matches bit for bit.
    """
    q, s = quantize_activations(x, 8)
    y = a8_accumulators(q, w[:, :in_features]).float() * s * scale.float()
    return y if bias is None else y + bias.float()


def int8_linear_a16(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: float activations times the dequantized int8 rows."""
    wd = w[:, :in_features].float() * scale.float().unsqueeze(1)
    return F.linear(x.float(), wd, None if bias is None else bias.float())


def float_rows_linear(x: torch.Tensor, w: torch.Tensor, in_features: int) -> torch.Tensor:
    """x against float rows stored in any float dtype (padding columns ignored), in float32."""
    return F.linear(x.float(), w[:, :in_features].float())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (Hugging Face's Llama): x (..., hs), cos/sin (hs,)
    or broadcastable -> x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2 | x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attn_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                scale: float, n_head: int | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> torch.Tensor:
    """One new token's attention over a cache, writing its k, v at row ``pos`` first.

    qkv (C + 2 Ckv,) = [q | k | v]; k_cache, v_cache (nkv, L, hs) are updated in place; returns (C,),
    C = n_head * hs (n_head defaults to nkv; more q heads than kv heads is grouped-query attention,
    q head h reading kv head h // (n_head // nkv)). cos, sin (hs,): RoPE at ``pos`` on q and k.
    """
    nkv, _, hs = k_cache.shape
    nh = n_head or nkv
    q = qkv[: nh * hs].view(nh, 1, hs)
    k, v = qkv[nh * hs:].view(2, nkv, 1, hs)
    if cos is not None:
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    k_cache[:, pos : pos + 1] = k
    v_cache[:, pos : pos + 1] = v
    keys, vals = k_cache[:, : pos + 1], v_cache[:, : pos + 1]
    if nh != nkv:  # (nkv, T, hs) -> (nh, T, hs), each kv head repeated for its group of q heads
        keys, vals = keys.repeat_interleave(nh // nkv, 0), vals.repeat_interleave(nh // nkv, 0)
    y = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, scale=scale)  # (nh, 1, hs)
    return y.reshape(nh * hs)
