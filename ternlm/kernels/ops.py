"""Packed ternary linear ops: compiled kernels with their reference twins, as torch custom ops.

The one way in is a BINDING: ``bind_linear`` validates the weight once, keeps (owns) the tensors
whose pointers it passes, picks the backend once, and returns a callable ``f(x, out=None)`` that
only checks x (and out) per call. Everything else here -- the functional ops, ``TernaryLinear``,
the decode runtime -- calls through it, so there is one marshalling site per compiled kernel.

    f = bind_linear(packed, scale, in_features, fmt="2bit", act_bits=8, bias=None,
                    group_size=None, backend="auto")
    f(x (M, in_features), out=None) -> float32 (M, out_features)

    linear_a8(x, packed, scale, in_features, fmt="2bit", act_bits=8, bias=None, backend="auto", group_size=None)
    linear_a16(x, packed, scale, in_features, fmt="2bit", bias=None, backend="auto", group_size=None)
    dequantize(packed, scale, in_features, fmt="2bit", backend="auto", group_size=None)  dense float32 (out, in)
    a8_accumulators(q, packed, in_features, fmt="2bit")        exact int32 (M, N), compiled
    quantize_activations(x, act_bits=8)                        compiled twin of the canonical one
    bind_int8_linear(w, scale, in_features, act_bits=8, bias=None, backend="auto")   int8 rows (LM head)
    bind_float_rows(w, in_features, backend="auto")            fp32/fp16/bf16 rows
    attn_decode(qkv, k_cache, v_cache, pos, scale, out=None)   one-token attention over a KV cache

Scales: 0-d (per tensor), (out,) (per channel) or (out, ceil(in / group_size)) (per group, the
last group possibly partial; pass ``group_size``).

``backend``: ``auto`` lets ``select_backend`` decide from the tensors' device (the one dispatch
decision: CUDA -> Triton, CPU -> compiled kernels, anything else -> reference); ``native``,
``triton`` and ``reference`` insist on one and raise when it cannot run.

Registered custom ops (``auto`` backend), usable under ``torch.inference_mode`` and
``torch.compile``: ``ternlm::w2a8_linear``, ``ternlm::w2a16_linear`` (2-bit) and
``ternlm::wb3a8_linear``, ``ternlm::wb3a16_linear`` (base-3), each
``(x, packed, scale, bias?, in_features, act_bits, group_size?) / (x, packed, scale, bias?, in_features, group_size?)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ternlm.config import ACT_BITS, FORMATS, QMAX
from ternlm.errors import TernlmError
from ternlm.kernels import _ext, reference
from ternlm.quant.pack import packed_row_bytes, padded_in_features

_FMT_ID = {"2bit": 0, "base3": 1}
assert set(_FMT_ID) == set(FORMATS)
_QMAX = QMAX  # local alias; the values live in ternlm.config
BACKENDS = ("auto", "native", "triton", "reference")
# From this many tokens on, W1.58A16 dequantizes the weight once and calls torch's fp32 GEMM:
# the decode is amortized and sgemm's register blocking beats add/subtract kernels.
A16_GEMM_MIN_TOKENS = 16
# Per-group scales on the fast paths: group sizes that are a multiple of this (32, 64, 128, 256...).
# The compiled kernels run any such size; Triton needs a multiple of 64 (one tl.dot slice).
GROUP_MULTIPLE = 32
TRITON_GROUP_MULTIPLE = 64


def check_group_size(group_size: int) -> int:
    """A per-group size the fast kernels run: a positive multiple of 32; raises TernlmError otherwise."""
    if not isinstance(group_size, int) or group_size < GROUP_MULTIPLE or group_size % GROUP_MULTIPLE:
        raise TernlmError(f"per-group scales on the packed kernels need group_size a multiple of {GROUP_MULTIPLE} "
                          f"(e.g. 64, 128, 256), got {group_size!r}")
    return group_size


def select_backend(device_type: str, has_extension: bool, has_triton: bool = False, fmt: str = "2bit",
                   group_size: int | None = None) -> str:
    """THE dispatch decision, the optimum-quanto way: 'triton', 'native' or 'reference'.

    CUDA tensors run the Triton kernels (2-bit format; per-group sizes a multiple of 64), CPU
    tensors the compiled kernels (per-group sizes a multiple of 32), everything else -- another
    device, no extension, no Triton, a layout the fast kernel lacks -- the pure-PyTorch reference.
    """
    grouped_ok = group_size is None or (group_size >= GROUP_MULTIPLE and group_size % GROUP_MULTIPLE == 0)
    if device_type == "cuda":
        if has_triton and fmt == "2bit" and (group_size is None or group_size % TRITON_GROUP_MULTIPLE == 0):
            return "triton"
        return "reference"
    if device_type == "cpu" and has_extension and grouped_ok:
        return "native"
    return "reference"


@functools.lru_cache(maxsize=None)
def _geometry(in_features: int, fmt: str) -> tuple[int, int]:
    """(padded in_features, packed bytes per row)."""
    if fmt not in _FMT_ID:
        raise TernlmError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return padded_in_features(in_features, fmt), packed_row_bytes(in_features, fmt)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous float32 tensor, without a copy when it already is one."""
    if t.dtype is not torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def _require_ext():
    mod = _ext.extension()
    if mod is None:
        raise TernlmError("compiled ternlm kernels are not available")
    return mod


def _triton_available() -> bool:
    from ternlm.kernels import triton_kernels

    return triton_kernels.triton_available()


def _resolve(backend: str, device: torch.device, fmt: str, group_size: int | None) -> str:
    """The backend a binding runs: ``select_backend`` for auto, else the forced one, checked."""
    if backend not in BACKENDS:
        raise TernlmError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return backend
    if backend == "auto":
        cpu = device.type == "cpu"
        return select_backend(device.type, cpu and _ext.extension() is not None,
                              device.type == "cuda" and _triton_available(), fmt, group_size)
    if backend == "native":
        if device.type != "cpu":
            raise TernlmError(f"the compiled kernels run CPU tensors, got {device}")
        _require_ext()
        if group_size is not None:
            check_group_size(group_size)
        return backend
    # triton
    if not _triton_available():
        raise TernlmError("Triton is not installed; pip install triton (or use backend='reference')")
    if fmt != "2bit":
        raise TernlmError(f"the Triton kernels take the 2bit format, not {fmt}")
    return backend


def _check_out(out: torch.Tensor, M: int, N: int) -> torch.Tensor:
    if out.shape != (M, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise TernlmError(f"out must be a contiguous float32 ({M}, {N}) tensor, got {out.dtype} {tuple(out.shape)}")
    return out


def _check_call(x: torch.Tensor, out: torch.Tensor | None, in_features: int, out_features: int,
                device: torch.device) -> int:
    """A bound kernel's call: x must be (M, in_features) on the weight's device, out (if any) (M, out_features)
    float32. Returns M."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise TernlmError(f"expected activations (M, {in_features}), got {tuple(x.shape)}")
    if x.device != device:
        raise TernlmError(f"activations on {x.device}, weight bound on {device}")
    if out is not None:
        _check_out(out, x.shape[0], out_features)
    return x.shape[0]


class BoundLinear:
    """A packed ternary weight bound to its kernel: ``f(x (M, in), out=None) -> float32 (M, out)``.

    Built by ``bind_linear``. Holds contiguous float32 copies (or the originals, when already so)
    of scale and bias and the contiguous packed codes, so the pointers it hands the compiled
    kernels stay valid as long as it lives. A call checks x's shape and device (and ``out``) in
    Python; nothing that fails a check reaches C.
    """

    __slots__ = ("packed", "scale", "bias", "in_features", "out_features", "fmt", "act_bits", "group_size",
                 "backend", "device", "_mod", "_args", "_run")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, in_features: int, fmt: str = "2bit",
                 act_bits: int | None = 8, bias: torch.Tensor | None = None, group_size: int | None = None,
                 backend: str = "auto"):
        kp, want = _geometry(in_features, fmt)
        if act_bits not in ACT_BITS:
            raise TernlmError(f"act_bits must be one of {ACT_BITS}, got {act_bits!r}")
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2 \
                or packed.shape[1] != want:
            raise TernlmError(f"expected {fmt} packed uint8 (out, {want}) for in_features={in_features}, got "
                              f"{getattr(packed, 'dtype', type(packed))} {tuple(getattr(packed, 'shape', ()))}")
        N = packed.shape[0]
        if not scale.is_floating_point() or scale.dim() > 2 or (scale.dim() >= 1 and scale.shape[0] != N):
            raise TernlmError(f"scale must be a float 0-d, ({N},) or ({N}, groups) tensor, got {scale.dtype} "
                              f"{tuple(scale.shape)}")
        g = reference.group_size_of(scale, in_features, group_size)
        if bias is not None and tuple(bias.shape) != (N,):
            raise TernlmError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        devices = {t.device for t in (packed, scale, bias) if t is not None and t.dim() > 0} or {packed.device}
        if len(devices) != 1:
            raise TernlmError(f"packed, scale and bias must share a device, got {sorted(map(str, devices))}")
        self.device = packed.device
        self.packed = packed if packed.is_contiguous() else packed.contiguous()
        self.scale = _f32(scale.to(self.device))
        self.bias = None if bias is None else _f32(bias)
        self.in_features, self.out_features = in_features, N
        self.fmt, self.act_bits, self.group_size = fmt, act_bits, g
        self.backend = _resolve(backend, self.device, fmt, g)
        self._mod = _ext.extension() if self.backend == "native" else None
        stride = 0 if self.scale.dim() == 0 else (1 if self.scale.dim() == 1 else self.scale.shape[1])
        # the compiled kernels' weight arguments, fixed for the binding's lifetime
        self._args = (_FMT_ID[fmt], in_features, self.packed.data_ptr(), N, kp, self.scale.data_ptr(), stride,
                      g or 0, 0 if self.bias is None else self.bias.data_ptr())
        self._run = {"native": self._native_a16 if act_bits is None else self._native_a8,
                     "triton": self._triton, "reference": self._reference}[self.backend]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        _check_call(x, out, self.in_features, self.out_features, self.device)
        return self._run(x, out)

    def _native_a8(self, x, out):
        x = _f32(x)
        M = x.shape[0]
        fmt_id, K, wp, N, kp, sp, stride, g, bp = self._args
        if out is None:
            out = torch.empty(M, N, dtype=torch.float32)
        if M and N:
            self._mod.linear_a8(fmt_id, _ext.level_id(), x.data_ptr(), M, K, wp, N, kp, sp, stride, g, bp,
                                _QMAX[self.act_bits], out.data_ptr(), _ext.get_num_threads())
        return out

    def _native_a16(self, x, out):
        x = _f32(x)
        M = x.shape[0]
        fmt_id, K, wp, N, kp, sp, stride, g, bp = self._args
        if M >= A16_GEMM_MIN_TOKENS:  # prompt: dequantize once, fp32 GEMM
            y = F.linear(x, self.dequantize(), self.bias)
            return y if out is None else out.copy_(y)
        if out is None:
            out = torch.empty(M, N, dtype=torch.float32)
        if M and N:
            self._mod.linear_a16(fmt_id, _ext.level_id(), x.data_ptr(), M, K, wp, N, kp, sp, stride, g, bp,
                                 out.data_ptr(), _ext.get_num_threads())
        return out

    def _triton(self, x, out):
        from ternlm.kernels import triton_kernels as tk

        if self.act_bits is None:
            y = tk.linear_a16_triton(x, self.packed, self.scale, self.in_features, self.bias, group_size=self.group_size)
        else:
            y = tk.linear_a8_triton(x, self.packed, self.scale, self.in_features, self.bias,
                                    group_size=self.group_size, act_bits=self.act_bits)
        return y if out is None else out.copy_(y)

    def _reference(self, x, out):
        args = (x, self.packed, self.scale, self.in_features, self.fmt)
        if self.act_bits is None:
            y = reference.linear_a16(*args, self.bias, group_size=self.group_size)
        else:
            y = reference.linear_a8(*args, self.act_bits, self.bias, group_size=self.group_size)
        return y if out is None else out.copy_(y)

    def step_args(self) -> tuple | None:
        """This binding as one linear of the compiled decode step (``csrc/decode_step.inc``): W1.58A8 on
        the compiled kernels, per tensor, per row or groups of a multiple of 64; None otherwise."""
        if self.backend != "native" or self.act_bits is None or (self.group_size or 0) % 64:
            return None
        fmt_id, K, wp, N, kp, sp, stride, g, bp = self._args
        return (fmt_id, K, N, kp, wp, sp, stride, g, bp, float(_QMAX[self.act_bits]))

    def dequantize(self) -> torch.Tensor:
        """Dense float32 (out, in) weight codes * scale (bitwise equal to the reference's)."""
        if self.backend != "native":
            return reference.dequantize(self.packed, self.scale, self.in_features, self.fmt,
                                        group_size=self.group_size)
        fmt_id, K, wp, N, kp, sp, stride, g, _ = self._args
        out = torch.empty(N, K, dtype=torch.float32)
        if out.numel():
            self._mod.dequantize(fmt_id, _ext.level_id(), wp, N, kp, K, sp, stride, g, out.data_ptr(),
                                 _ext.get_num_threads())
        return out

    def __repr__(self) -> str:
        a = f"A{self.act_bits}" if self.act_bits else "A16"
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"BoundLinear({self.in_features} -> {self.out_features}, W1.58{a}, {self.fmt}{g}, "
                f"backend={self.backend}, device={self.device})")


def bind_linear(packed: torch.Tensor, scale: torch.Tensor, in_features: int, fmt: str = "2bit",
                act_bits: int | None = 8, bias: torch.Tensor | None = None, group_size: int | None = None,
                backend: str = "auto") -> BoundLinear:
    """Bind a packed ternary weight to its kernel once; returns ``f(x, out=None)`` (see BoundLinear).

    ``act_bits`` 8 / 4: W1.58A8 / A4 (per-token int activations); None: W1.58A16 (float).
    """
    return BoundLinear(packed, scale, in_features, fmt, act_bits, bias, group_size, backend)


def linear_a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
              fmt: str = "2bit", act_bits: int = 8, bias: torch.Tensor | None = None,
              backend: str = "auto", group_size: int | None = None) -> torch.Tensor:
    """W1.58A8 (A4 with act_bits=4): ``bind_linear(...)(x)``, binding for this one call."""
    if act_bits is None:
        raise TernlmError("act_bits must be 8 or 4 for the integer path, got None (use linear_a16)")
    return BoundLinear(packed, scale, in_features, fmt, act_bits, bias, group_size, backend)(x)


def linear_a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
               fmt: str = "2bit", bias: torch.Tensor | None = None, backend: str = "auto",
               group_size: int | None = None) -> torch.Tensor:
    """W1.58A16: ``bind_linear(..., act_bits=None)(x)``, binding for this one call."""
    return BoundLinear(packed, scale, in_features, fmt, None, bias, group_size, backend)(x)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, in_features: int, fmt: str = "2bit",
               backend: str = "auto", group_size: int | None = None) -> torch.Tensor:
    """Dense float32 (out, in) weight, codes * scale (bitwise equal to the reference's)."""
    return BoundLinear(packed, scale, in_features, fmt, None, None, group_size, backend).dequantize()


def _x_stride(in_features: int, fmt: str) -> int:
    return -(-padded_in_features(in_features, fmt) // 64) * 64


def quantize_activations(x: torch.Tensor, act_bits: int = 8):
    """Compiled per-token absmax quantization: (q int8 (M, K), scale float32 (M, 1), sum int32 (M,)).

    Bitwise equal to ``ternlm.quant.activations.quantize_activations`` (tested).
    """
    mod = _require_ext()
    if act_bits not in _QMAX:
        raise TernlmError(f"act_bits must be one of {sorted(_QMAX)} for integer activations, got {act_bits!r}")
    if x.dim() != 2 or x.device.type != "cpu":
        raise TernlmError(f"expected CPU activations (M, K), got {tuple(x.shape)} on {x.device}")
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
    kp, want = _geometry(in_features, fmt)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != want or packed.device.type != "cpu":
        raise TernlmError(f"expected {fmt} packed uint8 CPU (out, {want}), got {packed.dtype} {tuple(packed.shape)}")
    kx = _x_stride(in_features, fmt)
    qp = torch.zeros(q.shape[0], kx, dtype=torch.int8)
    qp[:, :in_features] = q
    sums = q.to(torch.int32).sum(1, dtype=torch.int32).contiguous()
    packed = packed.contiguous()
    acc = torch.empty(q.shape[0], packed.shape[0], dtype=torch.int32)
    if acc.numel():
        mod.gemm_acc(_FMT_ID[fmt], _ext.level_id(), qp.data_ptr(), sums.data_ptr(), q.shape[0], kx,
                     packed.data_ptr(), packed.shape[0], kp, acc.data_ptr(), _ext.get_num_threads())
    return acc


# ---- torch custom ops: opaque to autograd/compile, with shape-only fakes for tracing ----------

def _fake(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=torch.float32)


def _register(fmt: str, tag: str):
    @torch.library.custom_op(f"ternlm::w{tag}a8_linear", mutates_args=())
    def a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
           in_features: int, act_bits: int, group_size: Optional[int] = None) -> torch.Tensor:
        return linear_a8(x, packed, scale, in_features, fmt, act_bits, bias, group_size=group_size)

    @torch.library.custom_op(f"ternlm::w{tag}a16_linear", mutates_args=())
    def a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
            in_features: int, group_size: Optional[int] = None) -> torch.Tensor:
        return linear_a16(x, packed, scale, in_features, fmt, bias, group_size=group_size)

    a8.register_fake(lambda x, packed, scale, bias, in_features, act_bits, group_size=None: _fake(x, packed))
    a16.register_fake(lambda x, packed, scale, bias, in_features, group_size=None: _fake(x, packed))
    return a8, a16


w2a8_linear, w2a16_linear = _register("2bit", "2")
wb3a8_linear, wb3a16_linear = _register("base3", "b3")

CUSTOM_OPS = {("2bit", 8): w2a8_linear, ("base3", 8): wb3a8_linear,
              ("2bit", None): w2a16_linear, ("base3", None): wb3a16_linear}


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                   fmt: str = "2bit", act_bits: int | None = 8, bias: torch.Tensor | None = None,
                   group_size: int | None = None) -> torch.Tensor:
    """Dispatch through the registered custom op for this format and activation precision."""
    if act_bits is None:
        return CUSTOM_OPS[(fmt, None)](x, packed, scale, bias, in_features, group_size)
    return CUSTOM_OPS[(fmt, 8)](x, packed, scale, bias, in_features, act_bits, group_size)


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


class BoundInt8Linear:
    """int8 rows w (N, Kx) with one float32 scale per row, bound once: ``f(x (M, in), out=None)``.

    W8A8 (act_bits=8: per-token int8 activations, exact int32 dot products) or W8A16 (None).
    Owns the tensors whose pointers it passes (see BoundLinear).
    """

    __slots__ = ("w", "scale", "bias", "in_features", "out_features", "act_bits", "backend", "_mod", "_fn", "_args")

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, in_features: int, act_bits: int | None = 8,
                 bias: torch.Tensor | None = None, backend: str = "auto"):
        if act_bits not in (8, None):
            raise TernlmError(f"int8 weights take act_bits 8 or None, got {act_bits!r}")
        kx = int8_row_stride(in_features)
        if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != kx:
            raise TernlmError(f"expected int8 rows (N, {kx}) (pad with pad_int8_rows), got {w.dtype} {tuple(w.shape)}")
        N = w.shape[0]
        if scale.shape != (N,) or not scale.is_floating_point():
            raise TernlmError(f"expected one float scale per row ({N},), got {scale.dtype} {tuple(scale.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise TernlmError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        self.w, self.scale = w.contiguous(), _f32(scale)
        self.bias = None if bias is None else _f32(bias)
        self.in_features, self.out_features, self.act_bits = in_features, N, act_bits
        self.backend = "reference" if _resolve(backend, w.device, "2bit", None) != "native" else "native"
        self._mod = _ext.extension() if self.backend == "native" else None
        self._fn = None if self._mod is None else (self._mod.int8_linear_a8 if act_bits == 8 else
                                                   self._mod.int8_linear_a16)
        self._args = (self.w.data_ptr(), N, kx, self.scale.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        M, N = _check_call(x, out, self.in_features, self.out_features, self.w.device), self.out_features
        if self._fn is None:
            fn = reference.int8_linear_a8 if self.act_bits == 8 else reference.int8_linear_a16
            y = fn(x, self.w, self.scale, self.in_features, self.bias)
            return y if out is None else out.copy_(y)
        x = _f32(x)
        if out is None:
            out = torch.empty(M, N, dtype=torch.float32)
        if M and N:
            wp, _, kx, sp, bp = self._args
            self._fn(_ext.level_id(), x.data_ptr(), M, self.in_features, wp, N, kx, sp, bp, out.data_ptr(),
                     _ext.get_num_threads())
        return out


def bind_int8_linear(w: torch.Tensor, scale: torch.Tensor, in_features: int, act_bits: int | None = 8,
                     bias: torch.Tensor | None = None, backend: str = "auto") -> BoundInt8Linear:
    """Bind int8 rows (padded with ``pad_int8_rows``) and their per-row scales once."""
    return BoundInt8Linear(w, scale, in_features, act_bits, bias, backend)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, in_features: int, act_bits: int | None = 8,
                bias: torch.Tensor | None = None, backend: str = "auto", out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x (M, in) against int8 rows w (N, Kx) with per-row scales: W8A8 (act_bits=8) or W8A16 (None).

    ``out`` (M, N) float32 is written in place when given.
    """
    return BoundInt8Linear(w, scale, in_features, act_bits, bias, backend)(x, out)


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


class BoundFloatRows:
    """fp32/fp16/bf16 rows w (N, Kx) (padded like pad_int8_rows), no bias, bound once:
    ``f(x (M, in) float, out=None) -> float32 (M, N)``.

    On the kernels' own thread pool, so a decode step never mixes it with torch's OpenMP team.
    """

    __slots__ = ("w", "in_features", "out_features", "backend", "_mod")

    def __init__(self, w: torch.Tensor, in_features: int, backend: str = "auto"):
        if w.dtype not in _WF or w.dim() != 2 or w.shape[1] != int8_row_stride(in_features):
            raise TernlmError(f"expected fp32/fp16/bf16 rows (N, {int8_row_stride(in_features)}), got "
                              f"{w.dtype} {tuple(w.shape)}")
        self.w = w.contiguous()
        self.in_features, self.out_features = in_features, w.shape[0]
        self.backend = "reference" if _resolve(backend, w.device, "2bit", None) != "native" else "native"
        self._mod = _ext.extension() if self.backend == "native" else None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        M, N = _check_call(x, out, self.in_features, self.out_features, self.w.device), self.out_features
        if self._mod is None:
            y = reference.float_rows_linear(x, self.w, self.in_features)
            return y if out is None else out.copy_(y)
        x = _f32(x)
        if out is None:
            out = torch.empty(M, N, dtype=torch.float32)
        if M and N:
            self._mod.float_linear(_ext.level_id(), _WF[self.w.dtype], x.data_ptr(), M, self.in_features,
                                   self.w.data_ptr(), N, self.w.shape[1], out.data_ptr(), _ext.get_num_threads())
        return out


def bind_float_rows(w: torch.Tensor, in_features: int, backend: str = "auto") -> BoundFloatRows:
    """Bind float rows (padded with ``pad_int8_rows``) once."""
    return BoundFloatRows(w, in_features, backend)


def float_rows_linear(x: torch.Tensor, w: torch.Tensor, in_features: int, backend: str = "auto",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) float32 against fp32/fp16/bf16 rows w (N, Kx) (padded like pad_int8_rows), no bias."""
    return BoundFloatRows(w, in_features, backend)(x, out)


# ---- a whole decode step in one compiled call ----

_WT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_WTE = {**_WT, torch.int8: 3}  # embedding rows: the float kinds, or int8 with a scale per row
_NORMS = {"layernorm": 0, "rmsnorm": 1}
_ACTS = {"gelu_tanh": 0, "gelu_erf": 1, "gated_silu": 2}


class CompiledStep:
    """One token through every layer and the LM head in one call of the compiled kernels
    (``csrc/decode_step.inc``): ``step(token, pos, logits)``. Built from the decode engine's own
    tensors, whose pointers it keeps: the caller keeps the tensors alive (the engine owns both).

    Layers are (norm1 weight, norm1 bias or None, norm2 weight, norm2 bias or None, attention scaling,
    qkv, o, up, down) with each linear a ``BoundLinear``; the head is a ``BoundInt8Linear`` or a
    ``BoundFloatRows``. ``CompiledStep.why_not(...)`` says why a model cannot run here (None: it can).
    """

    def __init__(self, *, hidden: int, n_head: int, n_kv_head: int, head_dim: int, inner: int, max_len: int,
                 norm: str, eps: float, act: str, wte: torch.Tensor, wpe, cos, sin, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, norm_f: tuple, head, layers: list, wte_scale: torch.Tensor | None = None):
        why = self.why_not(act, wte, head, layers)
        if why:
            raise TernlmError(f"the compiled decode step cannot run this model: {why}")
        self._mod = _ext.extension()
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        for t in (wte, wpe, cos, sin, k_cache, v_cache, *norm_f, wte_scale):
            if t is not None and not t.is_contiguous():
                raise TernlmError("the compiled decode step needs contiguous tensors")
        if (wte.dtype == torch.int8) != (wte_scale is not None) or \
                (wte_scale is not None and (wte_scale.dtype != torch.float32 or wte_scale.numel() != wte.shape[0])):
            raise TernlmError("int8 embedding rows need one float32 scale per row (and float rows none)")
        if isinstance(head, BoundInt8Linear):
            hk, hw, hs = (1 if head.act_bits == 8 else 2), 0, head.scale.data_ptr()
        else:
            hk, hw, hs = 0, _WT[head.w.dtype], 0
        self._cap = self._mod.step_new(
            _ext.level_id(), hidden, n_head, n_kv_head, head_dim, inner, wte.shape[0], max_len, _NORMS[norm],
            _ACTS[act], float(eps), wte.data_ptr(), _WTE[wte.dtype], ptr(wpe), ptr(cos), ptr(sin), k_cache.data_ptr(),
            v_cache.data_ptr(), ptr(norm_f[0]), ptr(norm_f[1]), hk, hw, head.w.data_ptr(), hs, head.w.shape[1],
            ptr(wte_scale))
        for n1w, n1b, n2w, n2b, scaling, *lins in layers:
            self._mod.step_layer(self._cap, ptr(n1w), ptr(n1b), ptr(n2w), ptr(n2b), float(scaling),
                                 *[f.step_args() for f in lins])

    @staticmethod
    def why_not(act: str, wte: torch.Tensor, head, layers: list) -> str | None:
        if _ext.extension() is None:
            return "the compiled kernels are not available"
        if act not in _ACTS:
            return "its MLP activation has no compiled twin"
        if wte.dtype not in _WTE:
            return f"its token embedding is {wte.dtype}"
        if not isinstance(head, (BoundInt8Linear, BoundFloatRows)) or head.backend != "native":
            return "its LM head is not on the compiled kernels"
        for *_, q, o, u, d in layers:
            if any(not isinstance(f, BoundLinear) or f.step_args() is None for f in (q, o, u, d)):
                return "a block linear is not a packed W1.58A8 layer on the compiled kernels"
        return None

    def __call__(self, token: int, pos: int, logits: torch.Tensor) -> torch.Tensor:
        self._mod.step_run(self._cap, token, pos, logits.data_ptr(), _ext.get_num_threads())
        return logits


# ---- one-token attention over the KV cache (decode) ----

def attn_decode(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, scale: float,
                out: torch.Tensor | None = None, backend: str = "auto", *, n_head: int | None = None,
                cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """Write the new token's k, v into row ``pos`` of the caches (nkv, L, hs) and return its attention
    output (C,) = softmax(q K^T * scale) V over rows 0..pos, C = n_head * hs.

    qkv (C + 2 nkv hs,) = [q | k | v]. ``n_head`` (default nkv) > nkv is grouped-query attention; ``cos``,
    ``sin`` (hs,) float32 apply RoPE at ``pos`` to q and k (k is cached rotated). ``out`` (C,) float32 is
    reused when given. Reference twin: ``reference.attn_decode``."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise TernlmError(f"expected caches (n_kv_head, max_len, head_dim), got {tuple(k_cache.shape)} and "
                          f"{tuple(v_cache.shape)}")
    nkv, L, hs = k_cache.shape
    nh = n_head or nkv
    if nh % nkv:
        raise TernlmError(f"n_head {nh} is not a multiple of the cache's {nkv} kv heads")
    if qkv.shape != ((nh + 2 * nkv) * hs,):
        raise TernlmError(f"expected qkv ({(nh + 2 * nkv) * hs},), got {tuple(qkv.shape)}")
    if not 0 <= pos < L:
        raise TernlmError(f"position {pos} outside the cache (max_len {L})")
    if (cos is None) != (sin is None) or (cos is not None and (cos.shape != (hs,) or sin.shape != (hs,) or hs % 2)):
        raise TernlmError(f"cos and sin must both be ({hs},) tensors (even head_dim) or both None")
    mod = _ext.extension() if _resolve(backend, qkv.device, "2bit", None) == "native" else None
    f32 = all(t.dtype == torch.float32 and t.is_contiguous() for t in (qkv, k_cache, v_cache, cos, sin)
              if t is not None)
    if mod is None or not f32:
        y = reference.attn_decode(qkv, k_cache, v_cache, pos, scale, nh, cos, sin)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(nh * hs)
    elif out.shape != (nh * hs,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise TernlmError(f"out must be a contiguous float32 ({nh * hs},) tensor")
    cp, sp = (0, 0) if cos is None else (cos.data_ptr(), sin.data_ptr())
    mod.attn_decode(_ext.level_id(), qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), nh, nkv, hs, L, pos,
                    float(scale), cp, sp, out.data_ptr(), _ext.get_num_threads())
    return out


def attn_decode_batch(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots, positions,
                      scale: float, *, layer: int | None = None, n_head: int | None = None,
                      cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``attn_decode`` for S sequences in one call: row j of ``qkv`` (S, W) is sequence ``slots[j]``'s new
    token at position ``positions[j]``, attending over that slot's cache. Caches hold every slot: (B, nkv,
    L, hs), or (B, n_layer, nkv, L, hs) with ``layer`` chosen. ``cos``, ``sin`` are whole RoPE tables
    (>= L, hs); row ``positions[j]`` serves sequence j. Returns ``out`` (S, n_head * hs), row j equal to
    ``attn_decode`` of that sequence alone (the compiled kernel runs the same per-sequence code, the
    sequences spread over threads)."""
    slots = [int(s) for s in slots]
    pos = [int(p) for p in positions]
    S = len(slots)
    if k_cache.shape != v_cache.shape or k_cache.dim() not in (4, 5):
        raise TernlmError(f"expected caches (slots, [n_layer,] n_kv_head, max_len, head_dim), got "
                          f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dim() == 5:
        if layer is None or not 0 <= layer < k_cache.shape[1]:
            raise TernlmError(f"5-D caches need layer= in [0, {k_cache.shape[1]}), got {layer}")
        kc, vc = k_cache[:, layer], v_cache[:, layer]
    else:
        kc, vc = k_cache, v_cache
    B, nkv, L, hs = kc.shape
    nh = n_head or nkv
    if nh % nkv:
        raise TernlmError(f"n_head {nh} is not a multiple of the cache's {nkv} kv heads")
    if len(pos) != S or qkv.dim() != 2 or qkv.shape != (S, (nh + 2 * nkv) * hs):
        raise TernlmError(f"expected qkv ({S}, {(nh + 2 * nkv) * hs}) and {S} positions, got {tuple(qkv.shape)} "
                          f"and {len(pos)}")
    if any(not 0 <= s < B for s in slots) or len(set(slots)) != S:
        raise TernlmError(f"slots must be distinct and in [0, {B}), got {slots}")
    if any(not 0 <= p < L for p in pos):
        raise TernlmError(f"positions must be in [0, {L}) (the cache's max_len), got {pos}")
    if out is None:
        out = torch.empty(S, nh * hs)
    mod = _ext.extension() if _resolve(backend, qkv.device, "2bit", None) == "native" else None
    f32 = all(t.dtype == torch.float32 for t in (qkv, kc, vc, out)) and qkv.stride(1) == 1 and out.stride(1) == 1 \
        and k_cache.is_contiguous() and v_cache.is_contiguous() and (
            cos is None or (cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
                            and cos.shape[1:] == (hs,) and sin.shape == cos.shape and cos.shape[0] >= L))
    if mod is None or not f32:
        for j, (s, p) in enumerate(zip(slots, pos)):
            cj, sj = (None, None) if cos is None else (cos[p], sin[p])
            out[j] = reference.attn_decode(qkv[j], kc[s], vc[s], p, scale, nh, cj, sj)
        return out
    idx = torch.tensor(slots, dtype=torch.int64) * (kc.stride(0) * 4)
    kb, vb = idx + kc.data_ptr(), idx + vc.data_ptr()
    pt = torch.tensor(pos, dtype=torch.int64)
    cp, sp = (0, 0) if cos is None else (cos.data_ptr(), sin.data_ptr())
    mod.attn_decode_batch(_ext.level_id(), S, qkv.data_ptr(), qkv.stride(0), kb.data_ptr(), vb.data_ptr(), 0, nh,
                          nkv, hs, L, float(scale), pt.data_ptr(), cp, sp, out.data_ptr(), out.stride(0),
                          _ext.get_num_threads())
    return out
    off = layer * nkv * L * hs if lay else 0
    kb = torch.tensor([c.data_ptr() for c in k_caches], dtype=torch.int64)
    vb = torch.tensor([c.data_ptr() for c in v_caches], dtype=torch.int64)
    pt = torch.tensor(pos, dtype=torch.int64)
    cp, sp = (0, 0) if cos is None else (cos.data_ptr(), sin.data_ptr())
    mod.attn_decode_batch(_ext.level_id(), S, qkv.data_ptr(), qkv.stride(0), kb.data_ptr(), vb.data_ptr(), off, nh,
                          nkv, hs, L, float(scale), pt.data_ptr(), cp, sp, out.data_ptr(), out.stride(0),
                          _ext.get_num_threads())
    return out
