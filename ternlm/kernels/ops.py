"""Packed ternary linear ops: compiled kernels with their reference twins, as torch custom ops.

Python API (2-D float activations (M, in_features) -> float32 (M, out_features)):

    linear_a8(x, packed, scale, in_features, fmt="2bit", act_bits=8, bias=None, backend="auto")
    linear_a16(x, packed, scale, in_features, fmt="2bit", bias=None, backend="auto")
    dequantize(packed, scale, in_features, fmt="2bit", backend="auto")     dense float32 (out, in)
    a8_accumulators(q, packed, in_features, fmt="2bit")        exact int32 (M, N), compiled
    quantize_activations(x, act_bits=8)                        compiled twin of the canonical one

``backend``: ``auto`` runs the compiled kernel when it is available and the scale is per tensor or
per channel, otherwise the reference; ``native`` insists on the compiled kernel (raises for
per-group scales, which it does not implement); ``reference`` runs ``ternlm.kernels.reference``.

Registered custom ops (``auto`` backend), usable under ``torch.inference_mode`` and
``torch.compile``: ``ternlm::w2a8_linear``, ``ternlm::w2a16_linear`` (2-bit) and
``ternlm::wb3a8_linear``, ``ternlm::wb3a16_linear`` (base-3), each
``(x, packed, scale, bias?, in_features, act_bits) / (x, packed, scale, bias?, in_features)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ternlm.errors import TernlmError
from ternlm.kernels import _ext, reference
from ternlm.quant.pack import packed_row_bytes, padded_in_features

_FMT_ID = {"2bit": 0, "base3": 1}
_QMAX = {8: 127.0, 4: 7.0}
BACKENDS = ("auto", "native", "reference")
# From this many tokens on, W1.58A16 dequantizes the weight once and calls torch's fp32 GEMM:
# the decode is amortized and sgemm's register blocking beats add/subtract kernels.
A16_GEMM_MIN_TOKENS = 16


@functools.lru_cache(maxsize=None)
def _geometry(in_features: int, fmt: str) -> tuple[int, int]:
    """(padded in_features, packed bytes per row); cached because decode calls this per layer."""
    if fmt not in _FMT_ID:
        raise TernlmError(f"unknown packed format {fmt!r}; choose 2bit or base3")
    return padded_in_features(in_features, fmt), packed_row_bytes(in_features, fmt)


def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int, fmt: str) -> int:
    """Validate shapes; returns the padded in_features the kernels take."""
    kp, want = _geometry(in_features, fmt)
    xs, ps = x.shape, packed.shape
    if len(xs) != 2 or xs[1] != in_features:
        raise TernlmError(f"expected activations (M, {in_features}), got {tuple(xs)}")
    if packed.dtype != torch.uint8 or len(ps) != 2 or ps[1] != want:
        raise TernlmError(f"expected {fmt} packed uint8 (out, {want}), got {packed.dtype} {tuple(ps)}")
    if scale.dim() == 1 and scale.shape[0] != ps[0]:
        raise TernlmError(f"per-channel scale has {scale.shape[0]} entries for {ps[0]} rows")
    if x.is_cuda or packed.is_cuda:
        raise TernlmError("the packed ternary kernels run on CPU tensors")
    return kp


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous float32 tensor, without a copy when it already is one."""
    if t.dtype is not torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def _native(backend: str, scale: torch.Tensor):
    """The extension module when the compiled kernel should run, else None."""
    if backend not in BACKENDS:
        raise TernlmError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return None
    if scale.dim() == 2:
        if backend == "native":
            raise TernlmError("the compiled kernels support per-tensor and per-channel scales, not per_group; "
                              "use backend='reference' (TernaryLinear does this automatically)")
        return None
    return _require_ext() if backend == "native" else _ext.extension()


def _require_ext():
    mod = _ext.extension()
    if mod is None:
        raise TernlmError("compiled ternlm kernels are not available")
    return mod


def _scale_args(scale: torch.Tensor):
    s = _f32(scale)
    return s, (0 if s.dim() == 0 else 1)


def _bias_ptr(bias: torch.Tensor | None, n: int):
    if bias is None:
        return None, 0
    if bias.shape != (n,):
        raise TernlmError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    b = _f32(bias)
    return b, b.data_ptr()


def linear_a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
              fmt: str = "2bit", act_bits: int = 8, bias: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    kp = _check(x, packed, scale, in_features, fmt)
    if act_bits not in _QMAX:
        raise TernlmError(f"act_bits must be 8 or 4 for the integer path, got {act_bits}")
    mod = _native(backend, scale)
    if mod is None:
        return reference.linear_a8(x, packed, scale, in_features, fmt, act_bits, bias)
    x = _f32(x)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    s, stride = _scale_args(scale)
    M, N = x.shape[0], packed.shape[0]
    b, bptr = _bias_ptr(bias, N)
    out = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        mod.linear_a8(_FMT_ID[fmt], _ext.level_id(), x.data_ptr(), M, in_features, packed.data_ptr(), N,
                      kp, s.data_ptr(), stride, bptr, _QMAX[act_bits],
                      out.data_ptr(), _ext.get_num_threads())
    return out


def linear_a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
               fmt: str = "2bit", bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    kp = _check(x, packed, scale, in_features, fmt)
    mod = _native(backend, scale)
    if mod is None:
        return reference.linear_a16(x, packed, scale, in_features, fmt, bias)
    x = _f32(x)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    s, stride = _scale_args(scale)
    M, N = x.shape[0], packed.shape[0]
    b, bptr = _bias_ptr(bias, N)
    if M >= A16_GEMM_MIN_TOKENS:
        return torch.nn.functional.linear(x, dequantize(packed, scale, in_features, fmt), b)
    out = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        mod.linear_a16(_FMT_ID[fmt], _ext.level_id(), x.data_ptr(), M, in_features, packed.data_ptr(), N,
                       kp, s.data_ptr(), stride, bptr, out.data_ptr(),
                       _ext.get_num_threads())
    return out


def dequantize(packed: torch.Tensor, scale: torch.Tensor, in_features: int, fmt: str = "2bit",
               backend: str = "auto") -> torch.Tensor:
    """Dense float32 (out, in) weight, codes * scale (bitwise equal to the reference's)."""
    mod = _native(backend, scale)
    if mod is None:
        return reference.dequantize(packed, scale, in_features, fmt)
    packed = packed.contiguous()
    s, stride = _scale_args(scale)
    out = torch.empty(packed.shape[0], in_features, dtype=torch.float32)
    if out.numel():
        mod.dequantize(_FMT_ID[fmt], _ext.level_id(), packed.data_ptr(), packed.shape[0],
                       padded_in_features(in_features, fmt), in_features, s.data_ptr(), stride, out.data_ptr(),
                       _ext.get_num_threads())
    return out


def _x_stride(in_features: int, fmt: str) -> int:
    return -(-padded_in_features(in_features, fmt) // 64) * 64


def quantize_activations(x: torch.Tensor, act_bits: int = 8):
    """Compiled per-token absmax quantization: (q int8 (M, K), scale float32 (M, 1), sum int32 (M,)).

    Bitwise equal to ``ternlm.quant.activations.quantize_activations`` (tested).
    """
    mod = _require_ext()
    x = _f32(x)
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8)
    s = torch.empty(M, 1, dtype=torch.float32)
    sums = torch.empty(M, dtype=torch.int32)
    mod.quantize_act(_ext.level_id(), x.data_ptr(), M, K, K, _QMAX[act_bits], q.data_ptr(), s.data_ptr(),
                     sums.data_ptr(), _ext.get_num_threads())
    return q, s, sums


def a8_accumulators(q: torch.Tensor, packed: torch.Tensor, in_features: int, fmt: str = "2bit") -> torch.Tensor:
    """Compiled exact int32 accumulators sum_k q[m, k] * code[n, k] for int8 q (M, in_features)."""
    mod = _require_ext()
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] != in_features:
        raise TernlmError(f"expected int8 activations (M, {in_features}), got {q.dtype} {tuple(q.shape)}")
    _check(q, packed, packed.new_zeros((), dtype=torch.float32), in_features, fmt)
    kx = _x_stride(in_features, fmt)
    qp = torch.zeros(q.shape[0], kx, dtype=torch.int8)
    qp[:, :in_features] = q
    sums = q.to(torch.int32).sum(1, dtype=torch.int32).contiguous()
    packed = packed.contiguous()
    acc = torch.empty(q.shape[0], packed.shape[0], dtype=torch.int32)
    if acc.numel():
        mod.gemm_acc(_FMT_ID[fmt], _ext.level_id(), qp.data_ptr(), sums.data_ptr(), q.shape[0], kx,
                     packed.data_ptr(), packed.shape[0], padded_in_features(in_features, fmt), acc.data_ptr(),
                     _ext.get_num_threads())
    return acc


# ---- torch custom ops: opaque to autograd/compile, with shape-only fakes for tracing ----------

def _fake(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=torch.float32)


def _register(fmt: str, tag: str):
    @torch.library.custom_op(f"ternlm::w{tag}a8_linear", mutates_args=())
    def a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
           in_features: int, act_bits: int) -> torch.Tensor:
        return linear_a8(x, packed, scale, in_features, fmt, act_bits, bias)

    @torch.library.custom_op(f"ternlm::w{tag}a16_linear", mutates_args=())
    def a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
            in_features: int) -> torch.Tensor:
        return linear_a16(x, packed, scale, in_features, fmt, bias)

    a8.register_fake(lambda x, packed, scale, bias, in_features, act_bits: _fake(x, packed))
    a16.register_fake(lambda x, packed, scale, bias, in_features: _fake(x, packed))
    return a8, a16


w2a8_linear, w2a16_linear = _register("2bit", "2")
wb3a8_linear, wb3a16_linear = _register("base3", "b3")

CUSTOM_OPS = {("2bit", 8): w2a8_linear, ("base3", 8): wb3a8_linear,
              ("2bit", None): w2a16_linear, ("base3", None): wb3a16_linear}


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                   fmt: str = "2bit", act_bits: int | None = 8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch through the registered custom op for this format and activation precision."""
    if act_bits is None:
        return CUSTOM_OPS[(fmt, None)](x, packed, scale, bias, in_features)
    return CUSTOM_OPS[(fmt, 8)](x, packed, scale, bias, in_features, act_bits)


# ---- int8 weights (the LM head): rows padded to a multiple of 64, one float32 scale per row ----

def int8_row_stride(in_features: int) -> int:
    return -(-in_features // 64) * 64


def pad_int8_rows(q: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, Kx) with zero columns up to the kernels' 64-element row stride (any dtype)."""
    kx = int8_row_stride(q.shape[1])
    if kx == q.shape[1]:
        return q.contiguous()
    out = q.new_zeros(q.shape[0], kx)
    out[:, :q.shape[1]] = q
    return out


def _check_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise TernlmError(f"expected activations (M, {in_features}), got {tuple(x.shape)}")
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != int8_row_stride(in_features):
        raise TernlmError(f"expected int8 rows (N, {int8_row_stride(in_features)}), got {w.dtype} {tuple(w.shape)}")
    if scale.shape != (w.shape[0],):
        raise TernlmError(f"expected one scale per row ({w.shape[0]},), got {tuple(scale.shape)}")


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, in_features: int, act_bits: int | None = 8,
                bias: torch.Tensor | None = None, backend: str = "auto", out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x (M, in) against int8 rows w (N, Kx) with per-row scales: W8A8 (act_bits=8) or W8A16 (None).

    ``out`` (M, N) float32 is written in place when given (the decode loop reuses one buffer).
    """
    _check_int8(x, w, scale, in_features)
    if act_bits not in (8, None):
        raise TernlmError(f"int8 weights take act_bits 8 or None, got {act_bits!r}")
    mod = _native(backend, scale)
    if mod is None:
        fn = reference.int8_linear_a8 if act_bits == 8 else reference.int8_linear_a16
        y = fn(x, w, scale, in_features, bias)
        return y if out is None else out.copy_(y)
    x = _f32(x)
    s = _f32(scale)
    M, N = x.shape[0], w.shape[0]
    b, bptr = _bias_ptr(bias, N)
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    elif out.shape != (M, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise TernlmError(f"out must be a contiguous float32 ({M}, {N}) tensor")
    if M and N:
        fn = mod.int8_linear_a8 if act_bits == 8 else mod.int8_linear_a16
        fn(_ext.level_id(), x.data_ptr(), M, in_features, w.data_ptr(), N, w.shape[1], s.data_ptr(), bptr,
           out.data_ptr(), _ext.get_num_threads())
    return out


def int8_accumulators(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Compiled exact int32 q (M, Kx) . w (N, Kx)^T for int8 activations and int8 rows."""
    mod = _require_ext()
    if q.dtype != torch.int8 or w.dtype != torch.int8 or q.dim() != 2 or w.dim() != 2 or q.shape[1] != w.shape[1]:
        raise TernlmError(f"expected int8 (M, Kx) and (N, Kx), got {tuple(q.shape)} and {tuple(w.shape)}")
    if q.shape[1] % 64:
        raise TernlmError("pad rows with pad_int8_rows first (Kx must be a multiple of 64)")
    q, w = q.contiguous(), w.contiguous()
    sums = q.to(torch.int32).sum(1, dtype=torch.int32).contiguous()
    acc = torch.empty(q.shape[0], w.shape[0], dtype=torch.int32)
    if acc.numel():
        mod.int8_acc(_ext.level_id(), q.data_ptr(), sums.data_ptr(), q.shape[0], q.shape[1], w.data_ptr(),
                     w.shape[0], acc.data_ptr(), _ext.get_num_threads())
    return acc


_WF = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def float_rows_linear(x: torch.Tensor, w: torch.Tensor, in_features: int, backend: str = "auto",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) float32 against fp32/fp16/bf16 rows w (N, Kx) (padded like pad_int8_rows), no bias.

    On the kernels' own thread pool, so a decode step never mixes it with torch's OpenMP team.
    """
    if w.dtype not in _WF or w.dim() != 2 or w.shape[1] != int8_row_stride(in_features):
        raise TernlmError(f"expected fp32/fp16/bf16 rows (N, {int8_row_stride(in_features)}), got "
                          f"{w.dtype} {tuple(w.shape)}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise TernlmError(f"expected activations (M, {in_features}), got {tuple(x.shape)}")
    mod = _native(backend, w.new_zeros((), dtype=torch.float32))
    if mod is None:
        y = reference.float_rows_linear(x, w, in_features)
        return y if out is None else out.copy_(y)
    x = _f32(x)
    M, N = x.shape[0], w.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    elif out.shape != (M, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise TernlmError(f"out must be a contiguous float32 ({M}, {N}) tensor")
    if M and N:
        mod.float_linear(_ext.level_id(), _WF[w.dtype], x.data_ptr(), M, in_features, w.data_ptr(), N, w.shape[1],
                         out.data_ptr(), _ext.get_num_threads())
    return out


# ---- one-token attention over the KV cache (decode) ----

def attn_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, scale: float,
                out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Write the new token's k, v into row ``pos`` of the caches (nh, L, hs) and return its attention
    output (C,) = softmax(q K^T * scale) V over rows 0..pos. ``out`` (C,) float32 is reused when given."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise TernlmError(f"expected caches (n_head, max_len, head_dim), got {tuple(k_cache.shape)} and "
                          f"{tuple(v_cache.shape)}")
    nh, L, hs = k_cache.shape
    if qkv.shape != (3 * nh * hs,):
        raise TernlmError(f"expected qkv ({3 * nh * hs},), got {tuple(qkv.shape)}")
    if not 0 <= pos < L:
        raise TernlmError(f"position {pos} outside the cache (max_len {L})")
    mod = _native(backend, qkv.new_zeros(()))
    f32 = all(t.dtype == torch.float32 and t.is_contiguous() for t in (qkv, k_cache, v_cache))
    if mod is None or not f32:
        y = reference.attn_decode(qkv, k_cache, v_cache, pos, scale)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(nh * hs)
    mod.attn_decode(_ext.level_id(), qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), nh, hs, L, pos,
                    float(scale), out.data_ptr())
    return out
