"""TernaryExperts: GPT-OSS's mixture-of-experts weights as packed ternary, one matrix per expert.

Hugging Face ``GptOssExperts`` holds two 3-D parameters, input-first:

    gate_up_proj (E, hidden, 2*inter)   gate and up interleaved along the last dim (gate = ::2)
    down_proj    (E, inter, hidden)
    + biases (E, 2*inter), (E, hidden)

Each expert slice becomes its own ternary matrix in the ``nn.Linear`` layout (out, in), with its
own scale(s) from the canonical quantizer, packed along the input like ``TernaryLinear``:

    gate_up_packed (E, 2*inter, row_bytes(hidden)) uint8   gate_up_scale (E, *scale_shape)
    down_packed    (E, hidden, row_bytes(inter))   uint8   down_scale    (E, *scale_shape)
    gate_up_proj_bias, down_proj_bias                      float32, as in the original

The forward pass mirrors ``GptOssExperts.forward`` (top-k routing is the router's, kept in float):
for every expert hit, its tokens go through the expert's two GEMMs on the compiled kernels
(``ternlm.kernels.bind_linear``, one binding per expert and matrix, cached), the clamped SwiGLU
in between, and are added back weighted by their routing score. ``kernel="reference"`` runs the
pure-PyTorch twin of the same integer math.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.kernels import ops
from ternlm.nn.ternary_linear import KernelChoice
from ternlm.quant.pack import pack, packed_row_bytes
from ternlm.quant.ternary import scale_shape, ternarize

# class name of a module holding 3-D expert parameters -> the model types it belongs to
SUPPORTED_EXPERTS = {"GptOssExperts": "gpt_oss", "MixtralExperts": "mixtral", "Qwen2MoeExperts": "qwen2_moe"}
# gpt_oss: (E, in, out) weights, gate/up interleaved, biases, clamped SwiGLU; the others (transformers 5
# stores Mixtral / Qwen-MoE experts as 3-D tensors too): (E, out, in), gate/up halves, no bias, act_fn
STYLES = ("gpt_oss", "mixtral")


def expert_style(experts: nn.Module) -> str:
    return "gpt_oss" if type(experts).__name__ == "GptOssExperts" else "mixtral"


def expert_dims(experts: nn.Module) -> tuple[int, int]:
    """(hidden, intermediate) of an expert module, whichever naming its class uses."""
    hidden = getattr(experts, "hidden_size", None) or experts.hidden_dim
    inter = getattr(experts, "intermediate_size", None) or experts.intermediate_dim
    return hidden, inter


def expert_modules(model: nn.Module) -> list[str]:
    """Names of the 3-D expert modules ternlm turns into ``TernaryExperts``.

    A module whose class name ends in ``Experts`` and holds 3-D parameters but is not a known kind
    is refused with the list of supported ones, rather than left in float unnoticed.
    """
    names = []
    for n, m in model.named_modules():
        cls = type(m).__name__
        if cls in SUPPORTED_EXPERTS:
            names.append(n)
        elif cls.endswith("Experts") and any(p.dim() == 3 for p in m.parameters(recurse=False)):
            raise TernlmError(f"{type(model).__name__} has experts of kind {cls}, which ternlm does not know; "
                              f"supported: {', '.join(f'{k} ({v})' for k, v in SUPPORTED_EXPERTS.items())}")
    return names


MATRICES = ("gate_up", "down")


class TernaryExperts(KernelChoice, nn.Module):
    """Packed ternary replacement for ``GptOssExperts``: same forward signature and result layout."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_bits: int | None = 8,
                 fmt: str = "2bit", granularity: str = "per_tensor", group_size: int = 128,
                 alpha: float = 1.702, limit: float = 7.0, kernel: str = "auto", style: str = "gpt_oss",
                 act_fn: nn.Module | None = None):
        super().__init__()
        if style not in STYLES:
            raise TernlmError(f"unknown experts style {style!r}; choose one of {', '.join(STYLES)}")
        self.style, self.act_fn = style, act_fn
        if granularity == "per_group":
            ops.check_group_size(group_size)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act_bits, self.fmt, self.granularity, self.group_size = act_bits, fmt, granularity, group_size
        self.alpha, self.limit = alpha, limit
        self.kernel = kernel
        E, H, I2, I = num_experts, hidden_size, 2 * intermediate_size, intermediate_size
        self.register_buffer("gate_up_packed", torch.zeros(E, I2, packed_row_bytes(H, fmt), dtype=torch.uint8))
        self.register_buffer("gate_up_scale", torch.ones(E, *scale_shape(I2, H, granularity, group_size)))
        biased = style == "gpt_oss"
        self.register_buffer("gate_up_proj_bias", torch.zeros(E, I2) if biased else None)
        self.register_buffer("down_packed", torch.zeros(E, H, packed_row_bytes(I, fmt), dtype=torch.uint8))
        self.register_buffer("down_scale", torch.ones(E, *scale_shape(H, I, granularity, group_size)))
        self.register_buffer("down_proj_bias", torch.zeros(E, H) if biased else None)
        self._bindings = (None, {})

    def dims(self, which: str) -> tuple[int, int]:
        """(out, in) of one expert's matrix."""
        H, I = self.hidden_size, self.intermediate_size
        return (2 * I, H) if which == "gate_up" else (H, I)

    @classmethod
    def empty_like(cls, experts: nn.Module, act_bits=8, fmt="2bit", granularity="per_tensor",
                   group_size=128) -> "TernaryExperts":
        hidden, inter = expert_dims(experts)
        return cls(experts.num_experts, hidden, inter, act_bits, fmt, granularity, group_size,
                   getattr(experts, "alpha", 1.702), getattr(experts, "limit", 7.0), style=expert_style(experts),
                   act_fn=getattr(experts, "act_fn", None))

    @classmethod
    def from_experts(cls, experts: nn.Module, cfg: TernaryConfig | None = None, fmt: str = "2bit",
                     kernel: str = "auto") -> "TernaryExperts":
        """Quantize a ``GptOssExperts`` (float 3-D parameters), one expert slice at a time."""
        cfg = cfg or TernaryConfig()
        m = cls.empty_like(experts, cfg.act_bits, fmt, cfg.granularity, cfg.group_size)
        m.kernel = kernel
        for which in MATRICES:
            w3 = getattr(experts, which + "_proj").detach()
            mats = (w3[e].t() if m.style == "gpt_oss" else w3[e] for e in range(m.num_experts))
            packed, scale = quantize_slices(mats, cfg, fmt)
            setattr(m, which + "_packed", packed)
            setattr(m, which + "_scale", scale)
            if m.style == "gpt_oss":
                setattr(m, which + "_proj_bias", getattr(experts, which + "_proj_bias").detach().float().clone())
        return m

    def _bound(self, which: str, e: int):
        packed, scale = getattr(self, which + "_packed"), getattr(self, which + "_scale")
        bias = getattr(self, which + "_proj_bias")
        key = (self.kernel, self.act_bits, self.gate_up_packed.data_ptr(), self.down_packed.data_ptr(),
               self.gate_up_scale.data_ptr(), self.down_scale.data_ptr(),
               None if self.gate_up_proj_bias is None else self.gate_up_proj_bias.data_ptr(),
               None if self.down_proj_bias is None else self.down_proj_bias.data_ptr())
        cached_key, table = getattr(self, "_bindings", (None, {}))
        if cached_key != key:
            table = {}
            self._bindings = (key, table)
        if (which, e) not in table:
            group = self.group_size if self.granularity == "per_group" else None
            backend = "reference" if self.kernel == "reference" else "auto"
            table[(which, e)] = ops.bind_linear(packed[e], scale[e], self.dims(which)[1], self.fmt, self.act_bits,
                                                None if bias is None else bias[e], group, backend)
        return table[(which, e)]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_bindings"] = (None, {})
        return state

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.style == "mixtral":
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        # hidden_states (T, H); router_indices (T, k); routing_weights (T, k)
        x = hidden_states.reshape(-1, self.hidden_size)
        out = torch.zeros_like(x)
        hit = torch.unique(router_indices.reshape(-1)).tolist()
        for e in hit:
            if e >= self.num_experts:
                continue
            token_idx, pos = torch.where(router_indices == e)
            xs = x[token_idx].float().contiguous()
            h = self._apply_gate(self._bound("gate_up", e)(xs))
            y = self._bound("down", e)(h.contiguous())
            out.index_add_(0, token_idx, (y * routing_weights[token_idx, pos, None]).to(x.dtype))
        return out.reshape(hidden_states.shape)

    def dequantize(self) -> dict[str, torch.Tensor]:
        """The float weights in Hugging Face's layout: gate_up_proj (E, H, 2I), down_proj (E, I, H), biases."""
        from ternlm.kernels import reference

        group = self.group_size if self.granularity == "per_group" else None
        out = {}
        for which in MATRICES:
            packed, scale = getattr(self, which + "_packed"), getattr(self, which + "_scale")
            w = torch.stack([reference.dequantize(packed[e], scale[e], self.dims(which)[1], self.fmt, torch.float32,
                                                  group) for e in range(self.num_experts)])
            out[which + "_proj"] = w.transpose(1, 2).contiguous() if self.style == "gpt_oss" else w
            if self.style == "gpt_oss":
                out[which + "_proj_bias"] = getattr(self, which + "_proj_bias").clone()
        return out

    def extra_repr(self) -> str:
        a = f"A{self.act_bits}" if self.act_bits else "A16"
        return (f"{self.style}, experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"W1.58{a}, fmt={self.fmt}, {self.granularity}, kernel={self.kernel}")


def quantize_slices(mats, cfg: TernaryConfig, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize and pack a sequence of (out, in) matrices, one at a time; stacked packed codes and scales."""
    packed, scales = [], []
    for w in mats:
        t = ternarize(w.float().contiguous(), cfg)
        packed.append(pack(t.codes, fmt))
        scales.append(t.scale.float())
    return torch.stack(packed).contiguous(), torch.stack(scales).contiguous()


def convert_experts(model: nn.Module, cfg: TernaryConfig, fmt: str = "2bit") -> list[str]:
    """Swap every known expert module of ``model`` for ``TernaryExperts``, in place; returns their names."""
    from ternlm.nn.surgery import replace_module

    names = expert_modules(model)
    for n in names:
        replace_module(model, n, TernaryExperts.from_experts(model.get_submodule(n), cfg, fmt))
    model.ternlm_experts = names
    return names


def ternary_experts(model: nn.Module) -> list[tuple[str, TernaryExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryExperts)]


# ---------------------------------------------------------------------------------------------
# Streaming: read one expert tensor (bf16/fp32 3-D, or MXFP4 blocks + scales), quantize per slice


def _source_names(module: str, which: str) -> tuple[str, str, str]:
    base = f"{module}.{which}_proj"
    return base, base + "_blocks", base + "_scales"


def check_expert_sources(lay: dict, reader) -> None:
    for module in lay["experts"]:
        biased = expert_style(lay["model"].get_submodule(module)) == "gpt_oss"
        for which in MATRICES:
            base, blocks, scales = _source_names(module, which)
            if not reader.has(base) and not (reader.has(blocks) and reader.has(scales)):
                raise TernlmError(f"neither {base} nor its MXFP4 {base}_blocks/_scales are in the source files "
                                  f"(experts saved one module per expert are not streamed: quantize with "
                                  f"--no-stream)")
            if biased and not reader.has(base + "_bias"):
                raise TernlmError(f"tensor {base}_bias is not in the source files")


def expert_mats(module: str, which: str, reader, style: str):
    """Yield each expert's (out, in) float32 matrix, decoding MXFP4 one expert at a time."""
    from ternlm.moe.mxfp4 import decode

    base, blocks, scales = _source_names(module, which)
    if reader.has(base):
        w3 = reader.get(base)  # gpt_oss (E, in, out) as Hugging Face holds it; mixtral (E, out, in)
        for e in range(w3.shape[0]):
            yield (w3[e].t() if style == "gpt_oss" else w3[e]).float()
    else:
        b, s = reader.get(blocks), reader.get(scales)  # (E, out, in/32, 16), (E, out, in/32): out-first
        for e in range(b.shape[0]):
            yield decode(b[e], s[e])


def convert_expert_tensors(module: str, reader, lay: dict, cfg) -> dict[str, torch.Tensor]:
    """The output tensors of one expert module, as ``TernaryExperts.from_experts`` + save would write them."""
    out = {}
    style = expert_style(lay["model"].get_submodule(module))
    for which in MATRICES:
        packed, scale = quantize_slices(expert_mats(module, which, reader, style), lay["tcfg"], cfg.fmt)
        out[f"{module}.{which}_packed"] = packed
        out[f"{module}.{which}_scale"] = scale
        if style == "gpt_oss":
            out[f"{module}.{which}_proj_bias"] = reader.get(f"{module}.{which}_proj_bias").float().contiguous()
    return out
