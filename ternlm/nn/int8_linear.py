"""Inference-only int8 baselines: absmax / zero-point weight-only int8 and LLM.int8().

Weights are held as real int8 buffers (1 byte per weight) plus float scales, always in the
(out, in) layout; a Conv1D's weight is transposed once, at conversion.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.config import Int8Config, LLMInt8Config
from ternlm.errors import TernlmError
from ternlm.nn.bitlinear import linear_weight_out_in
from ternlm.quant.int8 import Int8Tensor, dequantize_int8, quantize_int8
from ternlm.quant.llm_int8 import bitsandbytes_status, llm_int8_linear


class Int8Linear(nn.Module):
    """Weight-only int8 (absmax or zero-point); dequantizes on the fly, float activations."""

    def __init__(self, t: Int8Tensor, bias: torch.Tensor | None, config: Int8Config):
        super().__init__()
        self.config = config
        self.out_features, self.in_features = t.q.shape
        self.register_buffer("qweight", t.q)
        self.register_buffer("scale", t.scale.float())
        self.register_buffer("zero_point", t.zero_point if t.zero_point is not None else None)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_module(cls, m: nn.Module, config: Int8Config) -> "Int8Linear":
        return cls(quantize_int8(linear_weight_out_in(m), config), m.bias, config)

    def int8_tensor(self) -> Int8Tensor:
        return Int8Tensor(self.qweight, self.scale, self.zero_point, self.config.scheme, self.config.granularity)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_int8(self.int8_tensor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {self.config.scheme} {self.config.granularity}"


class LLMInt8Linear(nn.Module):
    """LLM.int8(): bitsandbytes' Linear8bitLt where usable, else the PyTorch implementation."""

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None, config: LLMInt8Config):
        super().__init__()
        self.config = config
        self.out_features, self.in_features = weight_out_in.shape
        usable, why = bitsandbytes_status()
        if config.backend == "bitsandbytes" and not usable:
            raise TernlmError(f"LLM.int8 backend 'bitsandbytes' requested but {why}")
        self.backend = "bitsandbytes" if (usable and config.backend != "torch") else "torch"
        self.backend_detail = why if self.backend == "bitsandbytes" else "ternlm PyTorch implementation"
        self.last_outlier_columns = 0
        if self.backend == "bitsandbytes":
            import bitsandbytes as bnb

            lin = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=bias is not None,
                                      has_fp16_weights=False, threshold=config.threshold)
            sd = {"weight": weight_out_in.detach().float().contiguous()}
            if bias is not None:
                sd["bias"] = bias.detach().float()
            lin.load_state_dict(sd)  # quantizes to int8 on load
            self.bnb = lin
            self.bias = None
        else:
            t = quantize_int8(weight_out_in, Int8Config("absmax", "per_channel"))
            self.register_buffer("qweight", t.q)
            self.register_buffer("row_scale", t.scale)
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_module(cls, m: nn.Module, config: LLMInt8Config) -> "LLMInt8Linear":
        return cls(linear_weight_out_in(m), m.bias, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "bitsandbytes":
            with warnings.catch_warnings():  # bnb warns on every call that it casts to fp16
                warnings.simplefilter("ignore")
                return self.bnb(x.float()).to(x.dtype)
        y, n = llm_int8_linear(x, self.qweight, self.row_scale, self.bias, self.config.threshold)
        self.last_outlier_columns = n
        return y

    def dequantize_weight(self) -> torch.Tensor:
        if self.backend == "bitsandbytes":
            w = self.bnb.weight
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = self.bnb.state.SCB
            return w.data.float() * scb.float()[:, None] / 127.0
        return self.qweight.float() * self.row_scale[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.config.threshold}, backend={self.backend}")


class Int8RowLinear(nn.Module):
    """A linear layer kept at int8 by a bits budget (``ternlm quantize --budget-bpw``): int8 rows, one
    float32 scale per row (the canonical int8 absmax quantizer, per output channel), run by the
    compiled int8 kernels: W8A8 (``act_bits=8``: per-token int8 activations, exact integer dot
    products, as the packed ternary layers beside it) or W8A16 (None).

    Buffers: ``qweight`` (out, in) int8, ``scale`` (out,) float32, optional ``bias`` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int | None = 8):
        super().__init__()
        if act_bits not in (None, 8):
            raise TernlmError(f"int8 rows take act_bits 8 or None, got {act_bits!r}")
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self._bound = None

    @classmethod
    def from_weight(cls, weight_out_in: torch.Tensor, bias: torch.Tensor | None, act_bits: int | None = 8):
        out_f, in_f = weight_out_in.shape
        with torch.device("meta"):
            m = cls(in_f, out_f, bias is not None, act_bits)
        t = quantize_int8(weight_out_in.detach().float(), Int8Config("absmax", "per_channel"))
        m.qweight, m.scale = t.q.contiguous(), t.scale.float().reshape(-1).contiguous()
        m.bias = None if bias is None else bias.detach().float().contiguous()
        return m

    @classmethod
    def from_module(cls, m: nn.Module, act_bits: int | None = 8) -> "Int8RowLinear":
        return cls.from_weight(linear_weight_out_in(m), m.bias, act_bits)

    def dequantize_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def bind(self):
        """The compiled kernel over this layer's rows (rows padded to 64 weights once, when needed)."""
        from ternlm.kernels import bind_int8_linear, pad_int8_rows

        key = (self.qweight.data_ptr(), self.act_bits, self.qweight.device)
        if self._bound is None or self._bound[0] != key:
            fn = bind_int8_linear(pad_int8_rows(self.qweight), self.scale, self.in_features, self.act_bits,
                                  bias=self.bias)
            self._bound = (key, fn)
        return self._bound[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training around it (distillation): a float path
            from ternlm.quant.activations import fake_quantize_activations

            xq = x + (fake_quantize_activations(x, 8) - x).detach() if self.act_bits == 8 else x  # straight-through
            return F.linear(xq, self.dequantize_weight().to(x.dtype), self.bias)
        shape = x.shape
        y = self.bind()(x.reshape(-1, self.in_features).float().contiguous())
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, "
                f"W8A{self.act_bits or 16}, bias={self.bias is not None}")
