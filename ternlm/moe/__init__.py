"""Mixture-of-experts support: GPT-OSS's 3-D expert tensors as packed ternary ``TernaryExperts``.

``expert_modules(model)`` names the expert modules ternlm quantizes (Hugging Face
``GptOssExperts``); Mixtral / Qwen-MoE style experts are ``ModuleList``s of ``nn.Linear`` and go
through the dense path. MXFP4 decoding of GPT-OSS checkpoints lives in ``ternlm.moe.mxfp4``.
"""

from __future__ import annotations

import torch.nn as nn

from ternlm.errors import TernlmError

# class name of a module holding 3-D expert parameters -> the model types it belongs to
SUPPORTED_EXPERTS = {"GptOssExperts": "gpt_oss"}


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


def convert_expert_tensors(module: str, reader, lay: dict, cfg) -> dict:
    from ternlm.moe.experts import convert_expert_tensors as f

    return f(module, reader, lay, cfg)


def check_expert_sources(lay: dict, reader) -> None:
    from ternlm.moe.experts import check_expert_sources as f

    f(lay, reader)
