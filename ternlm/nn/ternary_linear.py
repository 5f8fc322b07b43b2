"""TernaryLinear: the packed inference layer -- real 2-bit (or 1.6-bit) integers, not floats.

Holds the ternary codes packed along the input dimension (``ternlm.quant.pack``), the float32
scale(s) from the canonical quantizer, and an optional bias. Forward runs the compiled kernels:

    act_bits=8 (or 4)  W1.58A8: per-token absmax int8 activations, exact int32 accumulation
    act_bits=None      W1.58A16: float activations against the ternary weight

``kernel="reference"`` runs the pure-PyTorch twin of the same math (tests, debugging). Scales
are per tensor, per output channel or per group of ``group_size`` inputs (a multiple of 32; the
last group of a row may be partial), all on the fast kernels. The forward pass calls a binding
(``ternlm.kernels.bind_linear``) made once and re-made only when a buffer is replaced or moved.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternlm.config import KERNELS, TernaryConfig
from ternlm.errors import TernlmError
from ternlm.kernels import ops
from ternlm.quant.pack import FORMATS, pack, packed_row_bytes, unpack
from ternlm.quant.ternary import TernaryTensor, scale_shape, ternarize


class KernelChoice:
    """The ``kernel`` attribute of packed modules: ``auto`` (dispatch) or ``reference``, validated."""

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise TernlmError(f"unknown kernel {value!r}; choose one of {', '.join(KERNELS)}")
        self._kernel = value


class TernaryLinear(KernelChoice, nn.Module):
    """y = x W^T + b with W = codes * scale stored packed; x (..., in) -> (..., out) in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int | None = 8,
                 fmt: str = "2bit", granularity: str = "per_tensor", group_size: int = 128,
                 kernel: str = "auto"):
        super().__init__()
        if fmt not in FORMATS:
            raise TernlmError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if act_bits not in (None, 8, 4):
            raise TernlmError(f"act_bits must be None, 8 or 4, got {act_bits!r}")
        if granularity == "per_group":
            ops.check_group_size(group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = act_bits
        self.fmt = fmt
        self.granularity = granularity
        self.group_size = group_size
        self.kernel = kernel
        self.register_buffer("packed", torch.zeros(out_features, packed_row_bytes(in_features, fmt),
                                                   dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(scale_shape(out_features, in_features, granularity, group_size),
                                                 dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._binding = (None, None)  # (key of the bound tensors, BoundLinear)

    @classmethod
    def from_ternary(cls, t: TernaryTensor, bias: torch.Tensor | None = None, act_bits: int | None = 8,
                     fmt: str = "2bit", kernel: str = "auto") -> "TernaryLinear":
        out_f, in_f = t.codes.shape
        m = cls(in_f, out_f, bias is not None, act_bits, fmt, t.granularity, t.group_size, kernel)
        m.packed = pack(t.codes.cpu(), fmt)
        m.scale = t.scale.detach().float().cpu().contiguous()
        if bias is not None:
            m.bias = bias.detach().float().cpu().clone()
        return m

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    cfg: TernaryConfig | None = None, fmt: str = "2bit", kernel: str = "auto") -> "TernaryLinear":
        """Ternarize an (out, in) float weight with the canonical quantizer and pack it.

        ``cfg.act_bits`` picks the activation path (None: float activations).
        """
        cfg = cfg or TernaryConfig()
        return cls.from_ternary(ternarize(weight, cfg), bias, cfg.act_bits, fmt, kernel)

    @classmethod
    def from_linear(cls, module: nn.Module, cfg: TernaryConfig | None = None, fmt: str = "2bit",
                    kernel: str = "auto") -> "TernaryLinear":
        """From ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (whose weight is stored (in, out))."""
        from ternlm.nn.bitlinear import is_linear_like, linear_weight_out_in

        if not is_linear_like(module):
            raise TypeError(f"TernaryLinear.from_linear takes nn.Linear or Conv1D, not {type(module).__name__}")
        weight = linear_weight_out_in(module)  # Conv1D's (in, out) read as (out, in)
        return cls.from_weight(weight, module.bias, cfg, fmt, kernel)

    def ternary(self) -> TernaryTensor:
        codes = unpack(self.packed, (self.out_features, self.in_features), self.fmt)
        return TernaryTensor(codes, self.scale, self.granularity, self.group_size)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_binding"] = (None, None)  # raw pointers and the extension module are never copied
        return state

    @property
    def _group(self) -> int | None:
        return self.group_size if self.granularity == "per_group" else None

    def bind(self) -> "ops.BoundLinear":
        """The layer's kernel binding, ``f(x (M, in), out=None) -> float32 (M, out)``; made once
        and cached until a buffer is replaced (assignment, ``.to()``, ``load_state_dict(assign=True)``)
        or ``kernel`` changes. In-place updates of float32 buffers are seen by the binding."""
        key = (self.kernel, self.act_bits, self.packed.data_ptr(), self.packed.device, self.scale.data_ptr(),
               self.scale.dtype, None if self.bias is None else (self.bias.data_ptr(), self.bias.dtype))
        cached_key, bound = getattr(self, "_binding", (None, None))
        if cached_key != key or bound is None:
            backend = "reference" if self.kernel == "reference" else "auto"
            bound = ops.bind_linear(self.packed, self.scale, self.in_features, self.fmt, self.act_bits, self.bias,
                                    self._group, backend)
            self._binding = (key, bound)
        return bound

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight codes * scale, for debugging and reference comparisons."""
        from ternlm.kernels import reference

        return reference.dequantize(self.packed, self.scale, self.in_features, self.fmt, dtype, self._group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if torch.compiler.is_compiling():
            # the registered custom op is opaque to the compiler and has a shape-only fake
            if self.kernel == "reference":
                from ternlm.kernels import reference

                args = (x2, self.packed, self.scale, self.in_features, self.fmt)
                y = (reference.linear_a16(*args, self.bias, group_size=self._group) if self.act_bits is None else
                     reference.linear_a8(*args, self.act_bits, self.bias, group_size=self._group))
            else:
                y = ops.ternary_linear(x2, self.packed, self.scale, self.in_features, self.fmt, self.act_bits,
                                       self.bias, self._group)
        else:
            y = self.bind()(x2)  # eager: the bound kernel, minus the dispatcher's per-call overhead
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        a = f"A{self.act_bits}" if self.act_bits else "A16"
        g = f"({self.group_size})" if self.granularity == "per_group" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, W1.58{a}, fmt={self.fmt}, {self.granularity}{g}, kernel={self.kernel}")
