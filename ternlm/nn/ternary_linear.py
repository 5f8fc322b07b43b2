"""TernaryLinear: the packed inference layer -- real 2-bit (or 1.6-bit) integers, not floats.

Holds the ternary codes packed along the input dimension (``ternlm.quant.pack``), the float32
scale(s) from the canonical quantizer, and an optional bias. Forward runs the compiled kernels:

    act_bits=8 (or 4)  W1.58A8: per-token absmax int8 activations, exact int32 accumulation
    act_bits=None      W1.58A16: float activations against the ternary weight

``kernel="reference"`` runs the pure-PyTorch twin of the same math (tests, debugging).
Per-group scales always take the reference path (the compiled kernels do per-tensor/per-channel).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.kernels import ops, reference
from ternlm.quant.pack import FORMATS, pack, packed_row_bytes, unpack
from ternlm.quant.ternary import TernaryTensor, ternarize

KERNELS = ("auto", "reference")


def _scale_shape(out_features: int, in_features: int, granularity: str, group_size: int) -> tuple:
    return {"per_tensor": (), "per_channel": (out_features,),
            "per_group": (out_features, in_features // group_size)}[granularity]


class TernaryLinear(nn.Module):
    """y = x W^T + b with W = codes * scale stored packed; x (..., in) -> (..., out) in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int | None = 8,
                 fmt: str = "2bit", granularity: str = "per_tensor", group_size: int = 128,
                 kernel: str = "auto"):
        super().__init__()
        if fmt not in FORMATS:
            raise TernlmError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if act_bits not in (None, 8, 4):
            raise TernlmError(f"act_bits must be None, 8 or 4, got {act_bits!r}")
        if granularity == "per_group" and in_features % group_size:
            raise TernlmError(f"per_group needs in_features ({in_features}) divisible by group_size ({group_size})")
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = act_bits
        self.fmt = fmt
        self.granularity = granularity
        self.group_size = group_size
        self.kernel = kernel
        self.register_buffer("packed", torch.zeros(out_features, packed_row_bytes(in_features, fmt),
                                                   dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(_scale_shape(out_features, in_features, granularity, group_size),
                                                 dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise TernlmError(f"unknown kernel {value!r}; choose one of {', '.join(KERNELS)}")
        self._kernel = value

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
        if isinstance(module, nn.Linear):
            weight = module.weight
        else:
            from transformers.pytorch_utils import Conv1D

            if not isinstance(module, Conv1D):
                raise TypeError(f"TernaryLinear.from_linear takes nn.Linear or Conv1D, not {type(module).__name__}")
            weight = module.weight.t()  # Conv1D: (in, out) -> (out, in); the one transpose
        return cls.from_weight(weight, module.bias, cfg, fmt, kernel)

    def ternary(self) -> TernaryTensor:
        codes = unpack(self.packed, (self.out_features, self.in_features), self.fmt)
        return TernaryTensor(codes, self.scale, self.granularity, self.group_size)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight codes * scale, for debugging and reference comparisons."""
        return reference.dequantize(self.packed, self.scale, self.in_features, self.fmt, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        args = (x2, self.packed, self.scale, self.in_features, self.fmt)
        if self.kernel == "reference":
            y = (reference.linear_a16(*args, self.bias) if self.act_bits is None else
                 reference.linear_a8(*args, self.act_bits, self.bias))
        elif torch.compiler.is_compiling():
            # the registered custom op is opaque to the compiler and has a shape-only fake
            y = ops.ternary_linear(*args, self.act_bits, self.bias)
        else:
            # eager: the same function the op wraps, minus the dispatcher's per-call overhead
            y = (ops.linear_a16(*args, self.bias) if self.act_bits is None else
                 ops.linear_a8(*args, self.act_bits, self.bias))
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        a = f"A{self.act_bits}" if self.act_bits else "A16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, W1.58{a}, fmt={self.fmt}, {self.granularity}, kernel={self.kernel}")
