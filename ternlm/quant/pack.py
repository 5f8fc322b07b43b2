"""Packed storage for ternary codes: 2 bits per weight and base-3 (5 trits per byte, 1.6 bits).

Both formats pack each output row independently along the input dimension, so a kernel streams
one row's bytes and the matching activations side by side. Rows are padded to a whole number of
blocks (2-bit: of 64-weight planes, see below); the padding holds code 0, which contributes
nothing to a dot product, and the true ``(out_features, in_features)`` shape travels next to the
packed tensor (``unpack_*`` take it).

Stored values are ``code + 1`` in {0, 1, 2}, never the signed code: the kernels multiply the
unsigned value by signed int8 activations (``vpdpbusd`` / ``pmaddubsw`` want u8 x s8) and subtract
the activation sum once per token, since sum((c + 1) * x) - sum(x) = sum(c * x).

Pure PyTorch; the C kernels in ``csrc/`` read exactly these layouts.
"""

from __future__ import annotations

import torch

from ternlm.config import FORMATS
from ternlm.errors import TernlmError

# Weights per block and bytes per block, per format.
QK_2BIT = 256
BLOCK_BYTES_2BIT = 64
PLANE_2BIT = 64  # 2-bit rows are padded to whole 64-weight planes: full blocks, then a tail of 1-3 planes
QK_BASE3 = 160

_POW3 = (81, 27, 9, 3, 1)  # trit i of a byte has weight 3**(4 - i): trit 0 is the most significant


def block_size(fmt: str) -> int:
    """Rows are padded to a multiple of this many weights (2-bit: one plane; base-3: one block)."""
    return {"2bit": PLANE_2BIT, "base3": QK_BASE3}[_check_fmt(fmt)]


def padded_in_features(in_features: int, fmt: str) -> int:
    qk = block_size(fmt)
    return -(-in_features // qk) * qk


def packed_row_bytes(in_features: int, fmt: str) -> int:
    """Bytes one packed row takes (including block padding)."""
    kp = padded_in_features(in_features, fmt)
    return kp // 4 if fmt == "2bit" else kp // 5


def ternary_layer_bytes(out_f: int, in_f: int, fmt: str, granularity: str, group_size: int) -> int:
    """Bytes of an (out_f, in_f) packed ternary layer as stored: padded code rows + float32 scales."""
    from ternlm.quant.ternary import n_groups

    scales = {"per_tensor": 1, "per_channel": out_f, "per_group": out_f * n_groups(in_f, group_size)}[granularity]
    return out_f * packed_row_bytes(in_f, fmt) + 4 * scales


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TernlmError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _check_codes(codes: torch.Tensor) -> torch.Tensor:
    if codes.dim() != 2:
        raise TernlmError(f"packing expects 2-D codes (out, in), got shape {tuple(codes.shape)}")
    if codes.dtype != torch.int8:
        raise TernlmError(f"packing expects int8 codes, got {codes.dtype}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise TernlmError("packing expects ternary codes in {-1, 0, 1}")
    return codes


def legacy_row_bytes_2bit(in_features: int) -> int:
    """Row bytes of the earlier 2-bit layout, which padded every row to whole 256-weight blocks
    (``upgrade_2bit`` converts such rows; widths that are a multiple of 256 never differed)."""
    return -(-in_features // QK_2BIT) * BLOCK_BYTES_2BIT


def upgrade_2bit(packed: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """2-bit rows (any leading dims) of ``row_bytes`` bytes in the current layout: ``packed`` as it
    is, or converted from the earlier layout that padded rows to whole 256-weight blocks (told
    apart by the width; only widths that are not a multiple of 64 bytes ever differed). Rows of
    whole blocks are the same in both layouts, so the earlier rows unpack as blocks-only rows."""
    width = packed.shape[-1] if packed.dim() >= 2 else None
    if packed.dtype != torch.uint8 or width in (None, row_bytes) or width != legacy_row_bytes_2bit(row_bytes * 4):
        return packed
    rows = packed.reshape(-1, width)
    codes = unpack_2bit(rows, (rows.shape[0], width * 4))[:, :row_bytes * 4]
    return pack_2bit(codes).reshape(*packed.shape[:-1], row_bytes)


def _padded_unsigned(codes: torch.Tensor, qk: int) -> torch.Tensor:
    """(out, in) int8 codes -> (out, in_padded) uint8 values code + 1, padding = 1 (code 0)."""
    out_f, in_f = codes.shape
    kp = -(-in_f // qk) * qk
    u = torch.ones(out_f, kp, dtype=torch.uint8, device=codes.device)
    u[:, :in_f] = (codes + 1).to(torch.uint8)
    return u


def _check_packed(packed: torch.Tensor, shape, fmt: str) -> tuple[int, int]:
    out_f, in_f = (int(s) for s in shape)
    want = (out_f, packed_row_bytes(in_f, fmt))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        raise TernlmError(f"{fmt} packed tensor for shape {(out_f, in_f)} must be uint8 {want}, "
                          f"got {packed.dtype} {tuple(packed.shape)}")
    return out_f, in_f


# 2-bit layout: one block = 256 weights of a row in 64 bytes. Byte j of block b holds the four
# weights b*256 + j + 64*s, s = 0..3, as code + 1 in 2-bit fields:
#
#     byte j:   bit 7 6 | 5 4 | 3 2 | 1 0
#                  s=3  | s=2 | s=1 | s=0      -> weights j+192 | j+128 | j+64 | j
#
#     packed block:  [ byte 0 | byte 1 | ... | byte 63 ]
#     (v >> 2s) & 3  over all 64 bytes = weights 64*s .. 64*s+63, in order ("plane" s)
#
# Why: one 512-bit load of a block, then ``(v >> 2s) & 3`` for s = 0..3, gives four vectors of 64
# consecutive weights that line up byte-for-byte with four consecutive 64-byte loads of int8
# activations -- no shuffles. The 16-bit shift leaks bits across byte boundaries, but the mask
# keeps only the low two bits of each byte. A 256-bit machine splits the block into two halves
# (bytes 0-31, 32-63) and gets 32 consecutive weights per shift the same way.
#
# Tail: a row whose padded width is not a multiple of 256 (SmolLM2's 576 = 2 blocks + 64) ends with
# 1-3 tail planes of 64 weights in 16 bytes each, after its full blocks. Byte j of tail plane t holds
# weights t*64 + j + 16*s, s = 0..3, in the same 2-bit fields. A 128-bit load, shifted by 0, 2, 4, 6
# and masked, is 4 x 16 consecutive weights: [v | v >> 2] on 256 bits lines up with 32 consecutive
# activations, [v | v >> 2 | v >> 4 | v >> 6] on 512 bits with 64. Rows thus pad to whole planes
# (576 -> 576, not 768: 2.0 bits per weight instead of 2.67).
def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (out, in) in {-1, 0, 1} -> uint8 (out, ceil(in / 64) * 16)."""
    codes = _check_codes(codes)
    out_f = codes.shape[0]
    u = _padded_unsigned(codes, PLANE_2BIT)
    kb = u.shape[1] // QK_2BIT * QK_2BIT
    full = u[:, :kb].reshape(out_f, -1, 4, 64)  # (out, blocks, s, j)
    tail = u[:, kb:].reshape(out_f, -1, 4, 16)  # (out, planes, s, j)
    parts = [t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6) for t in (full, tail)]
    return torch.cat([p.reshape(out_f, -1) for p in parts], dim=1).contiguous()


def unpack_2bit(packed: torch.Tensor, shape) -> torch.Tensor:
    """uint8 from ``pack_2bit`` -> int8 codes of the true ``shape`` (out, in)."""
    out_f, in_f = _check_packed(packed, shape, "2bit")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).reshape(1, 1, 4, 1)
    bb = packed.shape[1] // BLOCK_BYTES_2BIT * BLOCK_BYTES_2BIT
    full = (packed[:, :bb].reshape(out_f, -1, 1, 64) >> shifts) & 3  # (out, blocks, s, j)
    tail = (packed[:, bb:].reshape(out_f, -1, 1, 16) >> shifts) & 3  # (out, planes, s, j)
    u = torch.cat([full.reshape(out_f, -1), tail.reshape(out_f, -1)], dim=1)
    return (u[:, :in_f].to(torch.int8) - 1).contiguous()


# Base-3 layout: one block = 160 weights of a row in 32 bytes, 5 trits per byte (1.6 bits/weight).
# Byte j of block b holds the five weights b*160 + j + 32*i, i = 0..4, as t_i = code + 1 in {0,1,2}:
#
#     q      = t_0*81 + t_1*27 + t_2*9 + t_3*3 + t_4        in [0, 242]
#     byte j = ceil(q * 256 / 243)                           in [0, 255]
#
#     packed block:  [ byte 0 | ... | byte 31 ]     trit i of every byte = weights 32*i .. 32*i+31
#
# Why the fixed-point byte rather than q itself: byte/256 ~ q/243 is the base-3 fraction
# 0.t_0 t_1 t_2 t_3 t_4, so trit i comes out with a multiply, a wrap to 8 bits and a high-byte
# take -- t_i = (((byte * 3**i) mod 256) * 3) >> 8 -- instead of divisions, which SIMD lacks.
# Rounding up makes this exact for all 243 values (tested exhaustively). 32-byte groups keep the
# row padding small (GPT-2's 768 pads to 800, not 960) and match one 256-bit vector.
def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (out, in) in {-1, 0, 1} -> uint8 (out, ceil(in / 160) * 32)."""
    codes = _check_codes(codes)
    out_f = codes.shape[0]
    u = _padded_unsigned(codes, QK_BASE3).to(torch.int32).reshape(out_f, -1, 5, 32)  # (out, blocks, i, j)
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=codes.device).reshape(1, 1, 5, 1)
    q = (u * pow3).sum(dim=2)
    packed = (q * 256 + 242) // 243
    return packed.to(torch.uint8).reshape(out_f, -1).contiguous()


def unpack_base3(packed: torch.Tensor, shape) -> torch.Tensor:
    """uint8 from ``pack_base3`` -> int8 codes of the true ``shape`` (out, in)."""
    out_f, in_f = _check_packed(packed, shape, "base3")
    p = packed.to(torch.int32).reshape(out_f, -1, 1, 32)
    mul = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=packed.device).reshape(1, 1, 5, 1)
    t = (((p * mul) & 255) * 3) >> 8  # (out, blocks, i, j)
    return (t.reshape(out_f, -1)[:, :in_f].to(torch.int8) - 1).contiguous()


def pack(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    return pack_2bit(codes) if _check_fmt(fmt) == "2bit" else pack_base3(codes)


def unpack(packed: torch.Tensor, shape, fmt: str) -> torch.Tensor:
    return unpack_2bit(packed, shape) if _check_fmt(fmt) == "2bit" else unpack_base3(packed, shape)
