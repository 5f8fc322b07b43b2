"""Triton GPU kernels for 2-bit packed ternary weights: W1.58A8 and W1.58A16 linears.

Twins of ``ternlm.kernels.reference.linear_a8`` / ``linear_a16`` for ``fmt="2bit"``, with the same
arguments (less ``fmt``) and the same float32 (M, out_features) result:

    linear_a8_triton(x, packed, scale, in_features, bias=None)    int8 activations, int32 accumulation
    linear_a16_triton(x, packed, scale, in_features, bias=None)   float activations, fp32 accumulation

The weight stays packed in GPU memory: each program loads the uint8 bytes of one 256-weight block
(64 bytes per row) and unpacks the codes in registers (shift, mask, subtract 1) right before
``tl.dot`` -- the dense weight is never built. Programs tile M (tokens) x N (out features) and
walk K (in features) one 64-weight plane at a time (full blocks, then the row's tail planes).

One token (decode, M = 1) runs kernels without ``tl.dot`` that quantize the token themselves (no
quantizer launches): ``gemv_splitk_kernel`` for W2A8 with per-tensor / per-row scales and rows of
whole 256-blocks (every program one weight tile, the whole weight in flight at once), and
``gemv_kernel`` for the rest (per group, tail planes) and for W2A16.

Scales: per tensor (0-d), per channel (out,) and per group (out, ceil(in / g)) when g is a
multiple of 64 (one 64-weight slice of a block then never straddles two groups; the last group
may be partial); other group sizes raise ``TernlmError``.

NOTE on numerics. W2A8 quantizes activations with the canonical torch quantizer
(``ternlm.quant.activations.quantize_activations``; the one-token kernels repeat its float32
operations in the kernel, IEEE division and round half to even, and are tested bit for bit against
it), accumulates int8 x ternary products exactly in int32, then computes
``(acc * act_scale) * w_scale (+ bias)`` in float32 in the reference's order, compiled with FMA
contraction off -- so per-tensor and per-channel outputs equal the reference bit for bit. Per-group
scales fold each group's exact accumulator in as ``y = y + acc_g * s_g``, group by group, then
``y * act_scale (+ bias)``: the reference's documented order, so they are bitwise equal too. W2A16 accumulates
``x * code`` in fp32 and scales once per channel (per group for group scales): equal to the
reference up to summation order. Float16/bfloat16 activations feed the tensor cores directly (the
products with codes in {-1, 0, 1} are exact); float32 activations use an IEEE fp32 dot, not TF32.

Testing: ``tests/kernels/test_triton.py`` runs these kernels on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``) against the reference, so the suite needs no GPU. GPU speed is
measured separately: ``python -m ternlm.bench.gpu_bench`` (checks on the GPU, then timings against cuBLAS).

Triton is imported lazily: this module imports (and ``triton_available()`` answers False) without it.
The kernels are built on first use, after ``TRITON_INTERPRET`` has been read.
"""

from __future__ import annotations

import contextlib

import functools
import os

import torch

from ternlm.config import QMAX
from ternlm.errors import TernlmError
from ternlm.quant.activations import ACT_EPS as _ACT_EPS
from ternlm.quant.activations import quantize_activations
from ternlm.quant.pack import BLOCK_BYTES_2BIT, QK_2BIT, packed_row_bytes

SUB_K = 64  # weights per shift of a block's bytes: the K of one tl.dot
# The kernels hard-code the 2-bit block geometry (256 weights = 4 shifts x 64 bytes).
assert QK_2BIT == 4 * SUB_K and BLOCK_BYTES_2BIT == SUB_K


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` (and ``triton.language``) import."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), read at each call."""
    if triton_available():
        from triton import knobs

        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _require_triton():
    if not triton_available():
        raise TernlmError("Triton is not installed; pip install triton (or use ternlm.kernels.reference)")
    import triton
    import triton.language as tl

    return triton, tl


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """Build the jitted kernels; cached per interpreter mode, since ``triton.jit`` reads it once."""
    triton, tl = _require_triton()

    # 2-bit layout (ternlm.quant.pack.pack_2bit), one block = 256 weights of a row in 64 bytes.
    # Byte j of block b holds weights b*256 + j + 64*s, s = 0..3, each stored as code + 1:
    #
    #     byte j:   bit 7 6 | 5 4 | 3 2 | 1 0
    #                  s=3  | s=2 | s=1 | s=0      -> weights j+192 | j+128 | j+64 | j
    #
    # So a (64, BLOCK_N) tile of block b's bytes, shifted right by 2s and masked with 3, is the
    # (64, BLOCK_N) slice of codes + 1 for inputs b*256 + 64*s + (0..63) ("plane" 4b + s), in order:
    # it lines up with a plain (BLOCK_M, 64) load of the activations, no gather or shuffle. A row
    # whose width is not a multiple of 256 ends in 1-3 tail planes of 16 bytes, byte j holding
    # weights j + 16*s: the plane's 64 byte offsets then repeat each byte four times, with the shift
    # 2 * (j // 16) per weight. Row padding past in_features stores 1 (code 0) and the activations
    # there load as 0. Rows past N load 0x55 = 01 01 01 01 (four code-0 weights); their outputs are
    # masked off anyway.
    #
    # Helpers shared by the kernels below, which reach them (and tl) through their closure.
    @triton.jit
    def plane_bytes(p, NP, rj):
        # byte offsets within a row, and shifts, of the 64 codes of plane p (rj = 0..63)
        full = p < NP // 4 * 4
        boff = tl.where(full, (p // 4) * 64 + rj, NP // 4 * 64 + (p - NP // 4 * 4) * 16 + rj % 16)
        shift = tl.where(full, 2 * (p % 4) + rj * 0, 2 * (rj // 16)).to(tl.uint8)
        return boff, shift

    @triton.jit
    def group_end(p, NP, GS, G, s_ptr, rn, n_ok):
        # whether a group ends with plane p (at a group's end, or at the row's last plane: a partial
        # last group), and the scales of p's group for rows rn; planes in the padding past K hold 0
        # and flush 0 * the last group's scale
        flush = ((p * 64 + 64) % GS == 0) | (p == NP - 1)
        gs = tl.load(s_ptr + rn * G + tl.minimum(p * 64 // GS, G - 1), mask=n_ok, other=0.0)
        return flush, gs

    @triton.jit
    def token_scale(x_ptr, K, eps, qmax, BLOCK_X: tl.constexpr):
        # the canonical quantizer's scale of one token: max(absmax, eps) / qmax, IEEE division
        amax = tl.zeros((BLOCK_X,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_X):
            kx = k0 + tl.arange(0, BLOCK_X)
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)))
        return tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), eps), qmax)

    @triton.jit
    def quantize(xv, xscale, qmax):
        # round(x / scale) clamped to +-qmax, as floats: IEEE division, round half to even by adding
        # and taking away 1.5 * 2**23 (exact for |x / scale| <= qmax)
        xv = (tl.math.div_rn(xv, xscale) + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(xv, -qmax), qmax)

    @triton.jit
    def row_epilogue(acc, xscale, s_ptr, b_ptr, rn, n_ok, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
        # one token's outputs in the reference's order: (acc * act_scale) * w_scale (+ bias); per
        # group (SCALE_MODE 2) acc already holds the scaled groups
        y = acc * xscale
        if SCALE_MODE == 0:
            y = y * tl.load(s_ptr)
        elif SCALE_MODE == 1:
            y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=n_ok, other=0.0)
        return y

    if interpret:  # the interpreter re-executes kernel source against the module's globals, not the closure
        globals().update(plane_bytes=plane_bytes, group_end=group_end, token_scale=token_scale, quantize=quantize,
                         row_epilogue=row_epilogue)

    @triton.jit
    def tile_rows(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # this program's (BLOCK_M, BLOCK_N) output tile: its rows and columns, their masks, and the
        # activation rows' and packed weight rows' base pointers
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
        w_rows = w_ptr + rn.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N)
        return rm, rn, m_ok, n_ok, x_rows, w_rows

    @triton.jit
    def plane_tile(x_rows, w_rows, p, NP, K, stride_xk, m_ok, n_ok):
        # plane p's (BLOCK_M, 64) activations (0 past K) and (64, BLOCK_N) int8 codes
        rj = tl.arange(0, 64)
        boff, shift = plane_bytes(p, NP, rj)
        wb = tl.load(w_rows + boff[:, None], mask=n_ok[None, :], other=0x55)
        kk = p * 64 + rj
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok[:, None] & (kk[None, :] < K), other=0)
        return xt, ((wb >> shift[:, None]) & 3).to(tl.int8) - 1

    @triton.jit
    def tile_store(acc, accf, xs, s_ptr, b_ptr, y_ptr, rm, rn, m_ok, n_ok, stride_ym,
                   SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
        # the reference's float32 ops in its order: (acc * act_scale) * w_scale (+ bias); per group
        # (SCALE_MODE 2) accf holds the scaled groups. W2A16 passes act scales of 1 (exact).
        if SCALE_MODE == 0:
            y = acc.to(tl.float32) * xs[:, None] * tl.load(s_ptr)
        elif SCALE_MODE == 1:
            y = acc.to(tl.float32) * xs[:, None] * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
        else:
            y = accf * xs[:, None]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])

    if interpret:
        globals().update(tile_rows=tile_rows, plane_tile=plane_tile, tile_store=tile_store)

    @triton.jit
    def w2a8_kernel(q_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, G, GS,
                    stride_qm, stride_qk, stride_wn, stride_ym,
                    SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # q (M, K) int8, xs (M,) float32 token scales, w (N, row_bytes) uint8 packed,
        # s: 0-d / (N,) / (N, G) float32 weight scales, y (M, N) float32
        rm, rn, m_ok, n_ok, q_rows, w_rows = tile_rows(q_ptr, w_ptr, M, N, stride_qm, stride_wn, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # exact: |acc| <= 127 * K
        accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # per group: sum of scaled groups
        NP = tl.cdiv(K, 64)  # 64-weight planes of a row: NP // 4 full blocks, then NP % 4 tail planes
        for p in range(0, NP):
            xq, w = plane_tile(q_rows, w_rows, p, NP, K, stride_qk, m_ok, n_ok)
            acc = tl.dot(xq, w, acc, out_dtype=tl.int32)
            if SCALE_MODE == 2:  # a group ends after this plane: fold its exact accumulator in, scaled
                flush, gs = group_end(p, NP, GS, G, s_ptr, rn, n_ok)
                accf = tl.where(flush, accf + acc.to(tl.float32) * gs[None, :], accf)
                acc = tl.where(flush, 0, acc)
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
        tile_store(acc, accf, xs, s_ptr, b_ptr, y_ptr, rm, rn, m_ok, n_ok, stride_ym, SCALE_MODE, HAS_BIAS)

    @triton.jit
    def w2a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, G, GS,
                     stride_xm, stride_xk, stride_wn, stride_ym,
                     SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # x (M, K) fp16/bf16/fp32, w (N, row_bytes) uint8 packed, s as in w2a8, y (M, N) float32.
        # DOT_F32: dot in IEEE fp32 (fp32 activations; bf16 ones under the interpreter, whose dot
        # cannot multiply bf16); otherwise the codes are cast to x's 16-bit type for the tensor cores.
        rm, rn, m_ok, n_ok, x_rows, w_rows = tile_rows(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        NP = tl.cdiv(K, 64)
        for p in range(0, NP):
            xt, w = plane_tile(x_rows, w_rows, p, NP, K, stride_xk, m_ok, n_ok)
            if DOT_F32:
                acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w.to(xt.dtype), acc)
            if SCALE_MODE == 2:
                flush, gs = group_end(p, NP, GS, G, s_ptr, rn, n_ok)
                accf = tl.where(flush, accf + acc * gs[None, :], accf)
                acc = tl.where(flush, 0.0, acc)
        tile_store(acc, accf, tl.full((BLOCK_M,), 1.0, tl.float32), s_ptr, b_ptr, y_ptr, rm, rn, m_ok, n_ok,
                   stride_ym, SCALE_MODE, HAS_BIAS)

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, G, GS, stride_wn, eps, qmax,
                    QUANT: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_X: tl.constexpr):
        # One token (decode): x (K,) float, w (N, row_bytes) uint8 packed, s as in w2a8, y (N,) float32.
        # QUANT: W2A8 -- the token is quantized here, op for op as the canonical quantizer
        # (ternlm.quant.int8.absmax_quantize: scale = max(amax, eps) / qmax, q = round(x / scale)
        # clamped, IEEE division, round half to even), so no separate quantizer launch. The products
        # q * code are small integers and their sums stay below 2**24 (the wrapper checks
        # qmax * K), so the float32 accumulators hold the exact integer sums of the int32 reference.
        # Not QUANT: W2A16, x . codes in float32. No tl.dot: with one token the tensor cores would
        # idle 15 of 16 rows; each program streams BLOCK_N rows, BLOCK_B 256-weight blocks a step.
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
        xscale = 1.0
        if QUANT:
            xscale = token_scale(x_ptr, K, eps, qmax, BLOCK_X)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)   # this group's (or the row's) sum
        accf = tl.zeros((BLOCK_N,), dtype=tl.float32)  # per group: sum of scaled groups
        NP = tl.cdiv(K, 64)  # 64-weight planes: NP // 4 full blocks, then NP % 4 tail planes
        NB = NP // 4
        ri = tl.arange(0, BLOCK_B * 64)
        for b0 in range(0, NB, BLOCK_B):
            blk = b0 + ri // 64
            b_ok = blk < NB
            wb = tl.load(w_rows + (blk * 64 + ri % 64)[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0x55)
            for s in tl.static_range(4):
                kk = blk * 256 + s * 64 + ri % 64
                xv = tl.load(x_ptr + kk, mask=b_ok & (kk < K), other=0.0).to(tl.float32)
                if QUANT:
                    xv = quantize(xv, xscale, qmax)
                c = ((wb >> (2 * s)) & 3).to(tl.float32) - 1.0
                acc += tl.sum(c * xv[None, :], axis=1)
                if SCALE_MODE == 2:  # one block a step (the wrapper sets BLOCK_B = 1): fold at group ends
                    flush, gs = group_end(b0 * 4 + s, NP, GS, G, s_ptr, rn, n_ok)
                    accf = tl.where(flush, accf + acc * gs, accf)
                    acc = tl.where(flush, 0.0, acc)
        # tail planes (16 bytes each), one a step
        rj = tl.arange(0, 64)
        for p in range(NB * 4, NP):
            boff, shift = plane_bytes(p, NP, rj)
            wb = tl.load(w_rows + boff[None, :], mask=n_ok[:, None], other=0x55)
            kk = p * 64 + rj
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if QUANT:
                xv = quantize(xv, xscale, qmax)
            c = ((wb >> shift[None, :]) & 3).to(tl.float32) - 1.0
            acc += tl.sum(c * xv[None, :], axis=1)
            if SCALE_MODE == 2:
                flush, gs = group_end(p, NP, GS, G, s_ptr, rn, n_ok)
                accf = tl.where(flush, accf + acc * gs, accf)
                acc = tl.where(flush, 0.0, acc)
        if SCALE_MODE == 2:
            acc = accf
        tl.store(y_ptr + rn, row_epilogue(acc, xscale, s_ptr, b_ptr, rn, n_ok, SCALE_MODE, HAS_BIAS), mask=n_ok)

    @triton.jit
    def gemv_splitk_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, N, K, stride_wn, eps, qmax,
                           SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_X: tl.constexpr):
        # One token, W2A8, per-tensor or per-row scales, K a multiple of 256 (no tail planes): the
        # one-token kernel split along K, so that every program loads ONE (BLOCK_N, BLOCK_B blocks)
        # tile -- issued before anything else -- and the whole weight is in flight at once instead
        # of each program walking its rows block after block. Each program quantizes the token as
        # gemv_kernel does (its own absmax pass over x), adds its exact integer partial sums into
        # part (float32 integers below 2**24: the order of the atomic adds cannot change them), and
        # the last program of a row block (a ticket from cnt) applies the reference's epilogue and
        # leaves part and cnt zeroed for the next call.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        ri = tl.arange(0, BLOCK_B * 64)
        blk = pid_k * BLOCK_B + ri // 64
        b_ok = blk < K // 256
        wb = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (blk * 64 + ri % 64)[None, :],
                     mask=n_ok[:, None] & b_ok[None, :], other=0x55)
        xscale = token_scale(x_ptr, K, eps, qmax, BLOCK_X)
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in tl.static_range(4):
            kk = blk * 256 + s * 64 + ri % 64
            xv = quantize(tl.load(x_ptr + kk, mask=b_ok, other=0.0).to(tl.float32), xscale, qmax)
            c = ((wb >> (2 * s)) & 3).to(tl.float32) - 1.0
            part += tl.sum(c * xv[None, :], axis=1)
        tl.atomic_add(part_ptr + rn, part, mask=n_ok, sem="relaxed")
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:  # the last: every partial sum is in
            acc = tl.atomic_add(part_ptr + rn, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=n_ok, sem="relaxed")
            tl.store(part_ptr + rn, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=n_ok)  # no one else reads them now
            tl.store(cnt_ptr + pid_n, 0)
            tl.store(y_ptr + rn, row_epilogue(acc, xscale, s_ptr, b_ptr, rn, n_ok, SCALE_MODE, HAS_BIAS), mask=n_ok)

    return w2a8_kernel, w2a16_kernel, gemv_kernel, gemv_splitk_kernel


def _check(x, packed, scale, in_features, bias, group_size=None):
    """Validate like ``ops._check``; returns (packed, scale mode 0/1/2, groups, group size, f32 scale, f32 bias)."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise TernlmError(f"expected activations (M, {in_features}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TernlmError(f"expected float activations, got {x.dtype}")
    want = packed_row_bytes(in_features, "2bit")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != want:
        raise TernlmError(f"expected 2bit packed uint8 (out, {want}), got {packed.dtype} {tuple(packed.shape)}")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    N = packed.shape[0]
    groups = 1
    if scale.dim() == 0:
        group_size = in_features
        mode = 0
    elif scale.dim() == 1 and scale.shape[0] == N:
        mode, group_size = 1, in_features
    elif scale.dim() == 2 and scale.shape[0] == N and scale.shape[1] > 0:
        from ternlm.kernels.reference import group_size_of

        mode, groups = 2, scale.shape[1]
        group_size = group_size_of(scale, in_features, group_size)
        if group_size % SUB_K:
            raise TernlmError(f"the Triton kernels support per-group scales only for group sizes that are a "
                              f"multiple of {SUB_K}, got {group_size} (use ternlm.kernels.reference)")
    else:
        raise TernlmError(f"scale must be 0-d, ({N},) or ({N}, groups), got {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise TernlmError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    tensors = [t for t in (x, packed, scale, bias) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise TernlmError(f"x, packed, scale and bias must share a device, got {[str(t.device) for t in tensors]}")
    if x.device.type != "cuda" and not interpreting():
        raise TernlmError(f"the Triton kernels need CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                          "to run them on CPU through Triton's interpreter")
    s = scale.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    return packed, mode, groups, group_size, s, b


def _tiles(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): small M tiles for decode, larger for prefill (tl.dot needs >= 16)."""
    # NOTE: untuned first guess (no GPU at hand when written); decode (M <= 16) takes narrow N tiles
    # so that more programs stream the weight at once.
    bm = min(128, max(16, _next_pow2(M)))
    bn = 32 if bm == 16 else 64 if bm == 32 or N <= 64 else 128
    return bm, bn, 8 if bm * bn >= 128 * 128 else 4


# One-token kernels (decode): rows per program, 256-weight blocks per step, warps, measured on an H200
# (python -m ternlm.bench.gpu_bench; README): see gemv_config() and splitk_config().
GEMV_BLOCK_X = 4096  # most activations per step of the in-kernel absmax (one step up to K = 4096)


def gemv_config(K: int, grouped: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_B, num_warps, num_stages) of the one-token kernel for rows K weights wide.

    From the H200 runs in the README: rows up to 1,024 wide (SmolLM2's 576) take 8 rows and 2 blocks
    a program (576 x 576: 4.2 us W2A8 against 14 us with 16 rows and 4 blocks, which leave half the
    step past the row's two blocks); wider rows 16 and 4 (4096 x 4096 W2A16: 10.6 us against 12.8)."""
    if _GEMV_OVERRIDE:
        bn, bb, w, st = _GEMV_OVERRIDE
    else:
        bn, bb, w, st = (8, 2, 4, 3) if K <= 1024 else (16, 4, 4, 3)
    return bn, 1 if grouped else bb, w, st


def splitk_config() -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_B, num_warps) of the split-K one-token W2A8 kernel: the fastest of 27 at 4096 x 4096
    on an H200 (README), 16.3 us; the slowest of the fastest eight took 16.8."""
    return tuple(_SPLITK_OVERRIDE) if _SPLITK_OVERRIDE else (32, 4, 4)


_GEMV_OVERRIDE: list = []  # the benchmark's sweeps set configurations here (through tile_override)
_SPLITK_OVERRIDE: list = []
_SPLITK_ENABLED = True  # the benchmark turns it off to time the unsplit kernel beside it


@contextlib.contextmanager
def tile_override(*, splitk: tuple | None = None, gemv: tuple | None = None, splitk_enabled: bool = True):
    """Inside the block, one-token kernels use these tiles (``splitk``: BLOCK_N, BLOCK_B, warps;
    ``gemv``: BLOCK_N, BLOCK_B, warps, stages) and split-K only when ``splitk_enabled``: the GPU
    benchmark's sweeps. The defaults come back on exit."""
    global _SPLITK_ENABLED
    saved = (list(_SPLITK_OVERRIDE), list(_GEMV_OVERRIDE), _SPLITK_ENABLED)
    _SPLITK_OVERRIDE[:] = list(splitk) if splitk else []
    _GEMV_OVERRIDE[:] = list(gemv) if gemv else []
    _SPLITK_ENABLED = splitk_enabled
    try:
        yield
    finally:
        _SPLITK_OVERRIDE[:], _GEMV_OVERRIDE[:] = saved[0], saved[1]
        _SPLITK_ENABLED = saved[2]


def tiles_are_default() -> bool:
    return not _SPLITK_OVERRIDE and not _GEMV_OVERRIDE and _SPLITK_ENABLED
_SCRATCH: dict = {}  # (device, stream) -> (float32 partial sums, int32 tickets), all zero between calls
_SCRATCH_KEEP: list = []  # outgrown scratch stays allocated: a captured CUDA graph may point at it


def _scratch(device, n: int):
    """The split-K kernel's scratch for this device and stream (kernels on one stream run one after
    another, so they can share it; two streams must not)."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _SCRATCH.get(key)
    if buf is None or buf[0].numel() < n:
        if buf is not None:
            _SCRATCH_KEEP.append(buf)
        n = max(n, 1 << 16)
        buf = _SCRATCH[key] = (torch.zeros(n, dtype=torch.float32, device=device),
                               torch.zeros(n, dtype=torch.int32, device=device))
    return buf


def gemv_fits(in_features: int, act_bits: int | None) -> bool:
    """True when one-token sums stay exact in the kernel's float32 accumulators (< 2**24)."""
    return act_bits is None or QMAX[act_bits] * in_features < 2 ** 24


def _gemv(x, packed, mode, groups, gsize, s, b, in_features, qmax):
    """One token: W2A8 (quantized in-kernel) when qmax is set, else W2A16; split along K where it can."""
    _require_triton()
    kernels = _kernels(interpreting())
    N = packed.shape[0]
    xr = x.reshape(-1)
    if x.dtype is torch.float64:
        xr = xr.float()
    xr = xr.contiguous()
    y = torch.empty(1, N, dtype=torch.float32, device=x.device)
    bx = min(GEMV_BLOCK_X, _next_pow2(in_features))
    if _SPLITK_ENABLED and qmax is not None and mode != 2 and in_features % 256 == 0:
        bn, bb, warps = splitk_config()
        part, cnt = _scratch(x.device, N)
        grid = (-(-N // bn), -(-(in_features // 256) // bb))
        kernels[3][grid](xr, packed, s, b if b is not None else s, y, part, cnt, N, in_features, packed.stride(0),
                         _ACT_EPS, qmax, SCALE_MODE=mode, HAS_BIAS=b is not None, BLOCK_N=bn, BLOCK_B=bb,
                         BLOCK_X=bx, num_warps=warps, num_stages=1, enable_fp_fusion=False)
        return y
    bn, bb, warps, stages = gemv_config(in_features, mode == 2)
    kernels[2][(-(-N // bn),)](xr, packed, s, b if b is not None else s, y, N, in_features, groups, gsize,
                               packed.stride(0), _ACT_EPS, qmax or 1.0,
                               QUANT=qmax is not None, SCALE_MODE=mode, HAS_BIAS=b is not None,
                               BLOCK_N=bn, BLOCK_B=bb, BLOCK_X=bx, num_warps=warps, num_stages=stages,
                               enable_fp_fusion=False)  # no FMA: bitwise like torch
    return y


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _start(x, packed, scale, in_features, bias, group_size):
    """A wrapper's checks and its float32 (M, N) output: ``(_check's tuple, y, done)``, done when the shape
    leaves nothing to compute (y then holds the answer: empty, or the bias alone)."""
    checked = _check(x, packed, scale, in_features, bias, group_size)
    M, N, b = x.shape[0], checked[0].shape[0], checked[5]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return checked, y, True
    if in_features == 0:
        return checked, (y.zero_() if b is None else y.copy_(b.expand(M, N))), True
    return checked, y, False


def linear_a8_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                     bias: torch.Tensor | None = None, group_size: int | None = None,
                     act_bits: int = 8) -> torch.Tensor:
    """W1.58A8 (A4 with act_bits=4) on 2-bit weights: per-token absmax int x (torch quantizer) .
    codes, int32 in-kernel."""
    (packed, mode, groups, gsize, s, b), y, done = _start(x, packed, scale, in_features, bias, group_size)
    if done:
        return y
    M, N = y.shape
    if M == 1 and gemv_fits(in_features, act_bits):
        return _gemv(x, packed, mode, groups, gsize, s, b, in_features, float(QMAX[act_bits]))
    _, tl = _require_triton()
    w2a8 = _kernels(interpreting())[0]
    # (M, K) int8, (M, 1) float32: the canonical quantizer; q keeps x's strides (passed along)
    q, xs = quantize_activations(x, act_bits)
    xs = xs.reshape(-1).contiguous()  # (M,)
    bm, bn, warps = _tiles(M, N)
    grid = (-(-M // bm), -(-N // bn))
    w2a8[grid](q, xs, packed, s, b if b is not None else s, y, M, N, in_features, groups, gsize,
               q.stride(0), q.stride(1), packed.stride(0), y.stride(0),
               SCALE_MODE=mode, HAS_BIAS=b is not None, BLOCK_M=bm, BLOCK_N=bn,
               num_warps=warps, num_stages=3, enable_fp_fusion=False)  # no FMA: bitwise like torch
    return y


def linear_a16_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                      bias: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """W1.58A16 on 2-bit weights: float x . codes in fp32, times the scale (+ bias). Returns float32."""
    (packed, mode, groups, gsize, s, b), y, done = _start(x, packed, scale, in_features, bias, group_size)
    if done:
        return y
    M, N = y.shape
    _require_triton()
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()  # e.g. float64: the reference computes in float32 too
    if M == 1:
        return _gemv(x, packed, mode, groups, gsize, s, b, in_features, None)
    w2a16 = _kernels(interpreting())[1]
    dot_f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting())
    bm, bn, warps = _tiles(M, N)
    grid = (-(-M // bm), -(-N // bn))
    w2a16[grid](x, packed, s, b if b is not None else s, y, M, N, in_features, groups, gsize,
                x.stride(0), x.stride(1), packed.stride(0), y.stride(0),
                SCALE_MODE=mode, HAS_BIAS=b is not None, DOT_F32=dot_f32, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=warps, num_stages=3)
    return y
