"""Model surgery: choose linear layers by name and swap them for quantized modules.

``quantize_model(model, QuantConfig(...))`` is the one entry point for every method; which module
replaces a layer is decided by the weight config's type (the registry below).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch.nn as nn

from ternlm.config import Int8Config, LLMInt8Config, QuantConfig, TernaryConfig, WeightConfig
from ternlm.errors import TernlmError
from ternlm.nn.bitlinear import BitLinear, is_linear_like


def _build(m: nn.Module, cfg: WeightConfig) -> nn.Module:
    from ternlm.nn.int8_linear import Int8Linear, LLMInt8Linear

    if isinstance(cfg, TernaryConfig):
        return BitLinear.from_module(m, cfg)
    if isinstance(cfg, Int8Config):
        return Int8Linear.from_module(m, cfg)
    if isinstance(cfg, LLMInt8Config):
        return LLMInt8Linear.from_module(m, cfg)
    raise TernlmError(f"no module for config {type(cfg).__name__}")


def linear_layers(model: nn.Module) -> list[str]:
    """Names of every nn.Linear / Conv1D in the model."""
    return [n for n, m in model.named_modules() if n and is_linear_like(m)]


def block_linear_layers(model: nn.Module) -> list[str]:
    """Linear layers inside the model's repeated transformer blocks.

    A block stack is an ``nn.ModuleList`` of same-class modules (GPT-2 ``transformer.h``, Llama
    ``model.layers``, BERT ``encoder.layer``); embeddings, norms, LM heads, poolers and
    classification heads live outside it and are left alone.
    """
    stacks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and not is_linear_like(m[0]) \
                and len({type(c) for c in m}) == 1:
            stacks.append(name)
    if not stacks:
        return []
    return [n for n in linear_layers(model)
            if any(n.startswith(s + ".") for s in stacks)]


def select_targets(model: nn.Module, config: QuantConfig) -> list[str]:
    candidates = linear_layers(model)
    if config.include:
        targets = [n for n in candidates if any(fnmatch(n, p) for p in config.include)]
    else:
        targets = block_linear_layers(model)
    targets = [n for n in targets if not any(fnmatch(n, p) for p in config.exclude)]
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)



def quantize_model(model: nn.Module, config: QuantConfig | WeightConfig | None = None) -> nn.Module:
    """Replace the selected linear layers in place; returns the model.

    The config and the list of targets are attached to the model (``ternlm_quant_config``,
    ``ternlm_targets``) so ``verify`` and the savers know what was meant to be quantized.
    """
    if config is None:
        config = QuantConfig()
    elif not isinstance(config, QuantConfig):
        config = QuantConfig(weights=config)
    targets = select_targets(model, config)
    if not targets:
        raise TernlmError(f"no linear layers matched in {type(model).__name__} "
                          f"(include={list(config.include) or 'transformer blocks'}, exclude={list(config.exclude)})")
    for name in targets:
        replace_module(model, name, _build(model.get_submodule(name), config.weights))
    model.ternlm_quant_config = config
    model.ternlm_targets = targets
    return model


def bit_linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, BitLinear)]


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """Set the fp -> ternary blend of every BitLinear (lambda warm-up)."""
    for m in bit_linears(model):
        m.quant_lambda = float(min(max(lam, 0.0), 1.0))


def project_to_ternary_(model: nn.Module) -> None:
    """Project every BitLinear's latent weights onto their ternary values."""
    for m in bit_linears(model):
        m.project_()


def ternary_linears(model: nn.Module) -> list:
    """(name, TernaryLinear) for every packed ternary layer of a converted model."""
    from ternlm.nn.ternary_linear import TernaryLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]


def trainable_from_packed(model: nn.Module, *, lambda_warmup_steps: int = 0) -> nn.Module:
    """Swap every packed ``TernaryLinear`` for a learned-scale ``BitLinear`` starting at its codes and
    scales (in place; returns the model), so that training (distillation, QAT from a calibrated PTQ
    start) begins exactly where the packed model is. The model keeps its quantization record, so
    ``ternlm.conversion.convert`` packs it back with the same layer selection."""
    from dataclasses import replace

    from ternlm.nn.embedding import float_embeddings

    layers = ternary_linears(model)
    if not layers:
        raise TernlmError("the model holds no TernaryLinear layers")
    float_embeddings(model)  # training needs float parameters (rows kept int8/fp16 are widened once)
    qc = getattr(model, "ternlm_quant_config", None)
    base = qc.weights if isinstance(qc, QuantConfig) and isinstance(qc.weights, TernaryConfig) else TernaryConfig()
    for name, m in layers:
        cfg = replace(base, act_bits=m.act_bits, lambda_warmup_steps=lambda_warmup_steps, project_after_step=False)
        replace_module(model, name, BitLinear.from_ternary(m.ternary(), m.bias, cfg))
    return model
