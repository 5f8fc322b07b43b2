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
