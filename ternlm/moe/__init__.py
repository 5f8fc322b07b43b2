"""Mixture-of-experts support: GPT-OSS's 3-D expert tensors as packed ternary ``TernaryExperts``.

``expert_modules(model)`` names the expert modules ternlm quantizes (Hugging Face
``GptOssExperts``); Mixtral / Qwen-MoE style experts are ``ModuleList``s of ``nn.Linear`` and go
through the dense path. MXFP4 decoding of GPT-OSS checkpoints lives in ``ternlm.moe.mxfp4``;
routed-token Hessians for calibrated PTQ in ``ternlm.moe.hessian``.

    from ternlm.moe import TernaryExperts, convert_experts, expert_modules
"""

from ternlm._lazy import lazy_exports

_LAZY = {
    "TernaryExperts": "ternlm.moe.experts",
    "convert_experts": "ternlm.moe.experts",
    "expert_modules": "ternlm.moe.experts",
    "ternary_experts": "ternlm.moe.experts",
    "SUPPORTED_EXPERTS": "ternlm.moe.experts",
    "decode": "ternlm.moe.mxfp4",
}

__getattr__, __all__ = lazy_exports("ternlm.moe", _LAZY)
