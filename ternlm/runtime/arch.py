"""What the decode engine is built from: the architecture description (``Arch``), the parts of one
model (``Parts``), and the small pieces shared by the two ways of gathering them (from a Hugging Face
model in ``ternlm.runtime.engine``, from checkpoint files in ``ternlm.runtime.lean``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ternlm.arch import ARCHS, Arch  # noqa: F401  (the one table of architectures; re-exported)

# GPT-2 MLP activations the compiled decode step computes, by the config's name for them
GPT2_ACT_KINDS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}


def act_kind(a: Arch, activation: str) -> str:
    """The compiled decode step's name for a model's MLP activation ("" when it has none): a gated
    MLP is gated SiLU, GPT-2's one of GPT2_ACT_KINDS."""
    return "gated_silu" if a.mlp == "gated_silu" else GPT2_ACT_KINDS.get(activation, "")


@dataclass
class Parts:
    """What the engine is built from, wherever it came from (a Hugging Face model in memory, or a
    ternlm checkpoint read tensor by tensor: ``ternlm.runtime.lean``). Norms are (weight, bias or
    None); linears are modules ``_bind`` takes (TernaryLinear, nn.Linear, Conv1D); ``cos``/``sin``
    are RoPE tables (max_seq_len, head_dim) or None; ``blocks`` holds per layer
    (norm1, qkv linears, o, norm2, up linears, down, attention scaling). ``act_kind`` names ``act`` for the
    compiled decode step (``act_kind``; "" when it has no compiled twin)."""

    arch: Arch
    wte: torch.Tensor
    head_w: torch.Tensor
    wpe: torch.Tensor | None
    norm_f: tuple
    act: Callable
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    blocks: list
    act_kind: str = ""
    wte_scale: torch.Tensor | None = None   # int8 embedding rows: one float32 scale per row
    head_scale: torch.Tensor | None = None  # int8 head rows (untied): one float32 scale per row


class FloatLinear:
    """Dense float rows (N, K) (nn.Linear layout), optionally with a bias; F.linear per call."""

    __slots__ = ("w", "b", "conv1d")

    def __init__(self, w, b, conv1d=False):
        self.w, self.b, self.conv1d = w, b, conv1d

    def __call__(self, x, out=None):
        if self.conv1d:  # weight (in, out): Conv1D's own addmm, so results match HF bit for bit
            return torch.addmm(self.b, x, self.w) if out is None else torch.addmm(self.b, x, self.w, out=out)
        y = F.linear(x, self.w, self.b)
        return y if out is None else out.copy_(y)


def gated_silu(inner: int) -> Callable:
    def act(u):  # u = [gate | up] (M, 2 * inner) -> silu(gate) * up (M, inner)
        return F.silu(u[:, :inner]).mul_(u[:, inner:])
    return act
