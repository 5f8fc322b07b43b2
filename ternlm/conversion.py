"""Convert: turn a model's ternary layers into packed ``TernaryLinear`` modules for inference.

Two inputs, one output:

    QAT model  (holds BitLinear)      -> codes and frozen scales of the trained latent weights
    plain HF model (nn.Linear/Conv1D) -> post-training quantization of the selected layers

Either way the result holds real packed integers (uint8) plus float32 scales; the latent fp32
weights are dropped. The model records what was done (``ternlm_quant_config``,
``ternlm_targets``, ``ternlm_format``) so savers and exporters write it into every file.
"""

from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from ternlm.config import QuantConfig, TernaryConfig
from ternlm.errors import TernlmError
from ternlm.nn.bitlinear import BitLinear
from ternlm.config import ACT_BITS, FORMATS
from ternlm.nn.surgery import replace_module, select_targets, ternary_linears
from ternlm.nn.ternary_linear import TernaryLinear

# ``act_bits`` default: take the activation precision from the ternary config.
FROM_CONFIG = "config"

# Config fields that decide the codes and scales; a QAT model must be converted with the ones it
# was trained with, or the packed layer would not compute what training optimised.
_CODE_FIELDS = ("granularity", "group_size", "scale_mode", "eps")


def _qat_config(bits: list[tuple[str, BitLinear]], config: TernaryConfig | None) -> TernaryConfig:
    cfgs = {tuple(getattr(m.config, f) for f in _CODE_FIELDS) for _, m in bits}
    if len(cfgs) > 1:
        raise TernlmError("the model's BitLinear layers use different ternary configs; convert them one by one")
    trained = bits[0][1].config
    if config is not None:
        for f in _CODE_FIELDS:
            if getattr(config, f) != getattr(trained, f):
                raise TernlmError(f"the model was trained with {f}={getattr(trained, f)!r}, not "
                                  f"{getattr(config, f)!r}; convert it with its own ternary config")
        return config
    return trained


def convert(model: nn.Module, config: TernaryConfig | QuantConfig | None = None, *, fmt: str = "2bit",
            act_bits: int | None | str = FROM_CONFIG, kernel: str = "auto") -> nn.Module:
    """Replace the model's ternary layers by packed ``TernaryLinear`` modules, in place; returns the model.

    config: for a QAT model (holding BitLinear) the config it was trained with is used and a
        different one is refused; for a plain model it picks the quantizer and, as a
        ``QuantConfig``, the layers (default: every linear layer of the transformer blocks).
    fmt: packed storage, ``2bit`` or ``base3`` (see ``ternlm.quant.pack``).
    act_bits: 8 or 4 quantize activations per token (W1.58A8/A4), None keeps them in float
        (W1.58A16); by default the config's ``act_bits``.
    kernel: ``auto`` (compiled kernels) or ``reference`` for the new layers.
    """
    if fmt not in FORMATS:
        raise TernlmError(f"unknown packed format {fmt!r}; choose one of {', '.join(FORMATS)}")
    qc = config if isinstance(config, QuantConfig) else None
    tcfg = qc.weights if qc is not None else config
    if tcfg is not None and not isinstance(tcfg, TernaryConfig):
        raise TernlmError(f"convert needs a TernaryConfig, got {type(tcfg).__name__}")

    bits = [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if bits:
        tcfg = _qat_config(bits, tcfg)
        targets = [n for n, _ in bits]
        # the layer selection QAT was prepared with (quantize_model records it)
        chosen = qc or getattr(model, "ternlm_quant_config", None) or QuantConfig()
        include, exclude = chosen.include, chosen.exclude
    else:
        if ternary_linears(model):
            raise TernlmError("the model is already converted (it holds TernaryLinear layers)")
        tcfg = tcfg or TernaryConfig()
        qc = qc or QuantConfig(weights=tcfg)
        targets = select_targets(model, qc)
        if not targets:
            raise TernlmError(f"no linear layers to convert in {type(model).__name__}")
        include, exclude = qc.include, qc.exclude

    bits_per_act = tcfg.act_bits if act_bits == FROM_CONFIG else act_bits
    if bits_per_act not in ACT_BITS:
        raise TernlmError(f"act_bits must be None, 8 or 4, got {bits_per_act!r}")
    tcfg = replace(tcfg, act_bits=bits_per_act)

    for name in targets:
        old = model.get_submodule(name)
        if isinstance(old, BitLinear):
            new = TernaryLinear.from_ternary(old.ternary(), old.bias, bits_per_act, fmt, kernel)
        else:
            new = TernaryLinear.from_linear(old, tcfg, fmt, kernel)
        replace_module(model, name, new)

    model.ternlm_quant_config = QuantConfig(weights=tcfg, include=include, exclude=exclude)
    model.ternlm_targets = list(targets)
    model.ternlm_format = fmt
    return model.eval()
