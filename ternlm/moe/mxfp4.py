"""MXFP4 (OCP microscaling FP4), the on-disk form of GPT-OSS's expert weights.

Layout as GPT-OSS checkpoints store it, for a weight of logical shape (..., out, in):

    <name>_blocks  uint8 (..., out, in/32, 16)   32 FP4 (E2M1) codes per block, two a byte:
                                                 element 2j in the low nibble, 2j+1 in the high one
    <name>_scales  uint8 (..., out, in/32)       E8M0: the block's scale is 2 ** (byte - 127)

An E2M1 nibble is sign (bit 3) | 3-bit magnitude index into 0, .5, 1, 1.5, 2, 3, 4, 6.
``decode`` returns the (..., out, in) float weight -- out-first, as ternlm's quantizer wants it
(Hugging Face transposes to (experts, in, out) after decoding; ``ternlm.moe.experts`` does not need to).
``encode`` is the inverse used to build test checkpoints (round to nearest FP4 value, largest
exponent that keeps the block's max within 6).
"""

from __future__ import annotations

import torch

from ternlm.errors import TernlmError

BLOCK = 32
E8M0_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., out, in/32, 16) uint8 codes + (..., out, in/32) uint8 exponents -> (..., out, in) float."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TernlmError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise TernlmError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    vals = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # (..., G, 16, 2)
    vals = vals.reshape(*blocks.shape[:-1], BLOCK)  # element 2j from the low nibble, 2j+1 from the high one
    out = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - E8M0_BIAS)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).to(dtype)


def encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float, in a multiple of 32 -> (blocks, scales) in GPT-OSS's layout."""
    if w.shape[-1] % BLOCK:
        raise TernlmError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, got {w.shape[-1]}")
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = g.abs().amax(-1)
    # smallest exponent e with amax / 2**e <= 6; empty blocks get 2**-127
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(1e-38) / 6.0)), torch.full_like(amax, -127.0))
    e = e.clamp(-127, 127)
    x = g / torch.ldexp(torch.ones_like(amax), e.int()).unsqueeze(-1)
    mags = torch.tensor(FP4_VALUES[:8])
    idx = (x.abs().unsqueeze(-1) - mags).abs().argmin(-1)  # nearest magnitude
    codes = (idx | ((x < 0).long() << 3)).to(torch.uint8)  # (..., G, 32)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e + E8M0_BIAS).to(torch.uint8).contiguous()
