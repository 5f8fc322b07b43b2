"""pt-bitnet for mixture-of-experts layers: each expert's rounding sees only the tokens routed to it.

For one block's 3-D expert module (GPT-OSS ``GptOssExperts``; Mixtral/Qwen-MoE style 3-D experts),
after the block's attention linears are quantized:

    run the block on the quantized stream; at the experts, per expert e:
        H_gate_up[e] = sum over tokens routed to e of  w_te x_t x_t^T        (x: the experts' input)
        H_down[e]    = sum over the same tokens of     w_te h_t h_t^T        (h: e's gated activation)
    (``ternlm.moe.hessian.RoutedHessian``, w_te the routing score, score-normalised)
    each expert slice (out, in): error-feedback ternary rounding with least-squares group scales
        over its Hessian (``ternlm.ptq.rounding.quantize_layer``), or, for an expert that saw fewer
        than ``min_tokens`` tokens, group-wise absmean rounding (no Hessian to trust)

The expert module then computes with codes x scales in float (its weights overwritten, frozen), so
the block's reconstruction still back-propagates through it; its codes and scales are kept on
the module and packed into ``TernaryExperts`` at the end, the same numbers.

NOTE: the expert scales are not trained by the reconstruction step (the linears' are); both of an
expert's matrices take their Hessian from the full-precision gated activation of one pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternlm.moe.experts import MATRICES, TernaryExperts, expert_style, expert_dims
from ternlm.moe.hessian import RoutedHessian
from ternlm.ptq.rounding import expand_groups
from ternlm.quant.activations import fake_quantize_activations

MIN_TOKENS = 16  # fewer routed calibration tokens than this: absmean rounding for that expert
_ATTR = "_ternlm_ptq"


def _matrix(experts: nn.Module, which: str, e: int) -> torch.Tensor:
    """Expert e's (out, in) float32 matrix."""
    w = getattr(experts, which + "_proj")[e].detach().float()
    return w.t().contiguous() if expert_style(experts) == "gpt_oss" else w.contiguous()


def _set_matrix(experts: nn.Module, which: str, e: int, w: torch.Tensor) -> None:
    p = getattr(experts, which + "_proj")
    with torch.no_grad():
        p[e].copy_(w.t() if expert_style(experts) == "gpt_oss" else w)


def _gated(experts: nn.Module, e: int, xs: torch.Tensor) -> torch.Tensor:
    """Expert e's activation between its two matrices for tokens xs (n, hidden)."""
    w = experts.gate_up_proj[e].detach().float()  # the stored layout, no copy per call
    if expert_style(experts) == "gpt_oss":  # (in, out)
        return experts._apply_gate(xs @ w + experts.gate_up_proj_bias[e].detach().float())
    gate, up = (xs @ w.t()).chunk(2, dim=-1)  # (out, in)
    return experts.act_fn(gate) * up


@torch.no_grad()
def routed_hessians(block: nn.Module, name: str, x: torch.Tensor, kw: dict, act_bits: int | None):
    """Per expert of ``block.<name>``: (gate_up Hessians, down Hessians, routed token counts)."""
    from ternlm.ptq.calibration import run_block_batched

    experts = block.get_submodule(name)
    hidden, inter = expert_dims(experts)
    hg, hd = RoutedHessian(experts.num_experts, hidden), RoutedHessian(experts.num_experts, inter)

    def hook(module, args, kwargs):
        names = ("hidden_states", "router_indices", "routing_weights")
        vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
        hs, idx, w = vals[:3]
        xs_all = hs.reshape(-1, hidden).float()
        if act_bits is not None:
            xs_all = fake_quantize_activations(xs_all, act_bits)
        hg.add(xs_all, idx, w)
        for e in torch.unique(idx).tolist():
            if e >= experts.num_experts:
                continue
            tok, pos = torch.where(idx == e)
            h = _gated(experts, e, xs_all[tok])
            if act_bits is not None:
                h = fake_quantize_activations(h, act_bits)
            hd.add_expert(e, h, w[tok, pos])

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_block_batched(block, x, kw)
    finally:
        handle.remove()
    return hg, hd


def quantize_experts(block: nn.Module, name: str, x_q: torch.Tensor, kw: dict, cfg, info: dict) -> None:
    """Round every expert slice of ``block.<name>`` to ternary (see the module docstring), in place."""
    from ternlm.config import TernaryConfig
    from ternlm.ptq.rounding import quantize_layer
    from ternlm.quant.ternary import ternarize

    experts = block.get_submodule(name)
    hg, hd = routed_hessians(block, name, x_q, kw, cfg.act_bits)
    fallback_cfg = TernaryConfig(granularity="per_group", group_size=cfg.group_size)
    kept = {}
    stats = {"tokens": hg.tokens.tolist(), "fallback": [], "rel_err": {}}
    for which, rh in zip(MATRICES, (hg, hd)):
        hs = rh.finalize(damp=0.0, min_tokens=MIN_TOKENS)
        codes, scales, errs = [], [], []
        for e in range(experts.num_experts):
            w = _matrix(experts, which, e)
            if hs[e] is None:
                t = ternarize(w, fallback_cfg)
                c, s = t.codes.float(), t.scale.float()
                if which == "gate_up":
                    stats["fallback"].append(e)
            else:
                c, s, lay_info = quantize_layer(w, hs[e].double(), cfg.group_size, damp=cfg.damp,
                                                block_cols=cfg.block_cols, error_feedback=cfg.error_feedback,
                                                refit_iters=cfg.refit_iters, name=f"{name}[{e}].{which}")
                errs.append(lay_info["rel_err"])
            _set_matrix(experts, which, e, c * expand_groups(s, w.shape[1], cfg.group_size))
            codes.append(c.to(torch.int8))
            scales.append(s.float().contiguous())
        kept[which] = (torch.stack(codes), torch.stack(scales))
        stats["rel_err"][which] = sum(errs) / len(errs) if errs else None
    experts.requires_grad_(False)
    setattr(experts, _ATTR, kept)
    info[name] = stats


def pack_experts(root: nn.Module, name: str, cfg, kernel: str = "auto") -> None:
    """Replace the calibrated expert module ``name`` under ``root`` by packed ``TernaryExperts``."""
    from ternlm.nn.surgery import replace_module
    from ternlm.quant.pack import pack

    experts = root.get_submodule(name)
    kept = getattr(experts, _ATTR)
    new = TernaryExperts.empty_like(experts, cfg.act_bits, cfg.fmt, "per_group", cfg.group_size)
    new.kernel = kernel
    for which in MATRICES:
        codes, scales = kept[which]
        setattr(new, which + "_packed", torch.stack([pack(c, cfg.fmt) for c in codes]).contiguous())
        setattr(new, which + "_scale", scales.contiguous())
        if new.style == "gpt_oss":
            setattr(new, which + "_proj_bias", getattr(experts, which + "_proj_bias").detach().float().clone())
    replace_module(root, name, new)
