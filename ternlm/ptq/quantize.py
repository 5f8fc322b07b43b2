"""``ptbitnet_quantize``: calibrated ternary PTQ of a causal LM's transformer blocks.

Per block, in order (memory: the model + two activation streams of n_seq x seq_len x hidden):

    y_fp = block(x_fp)                        full-precision target, fed the fp stream
    H    = X^T X of each linear's input       on the quantized stream x_q
    stage 1: migrate per-channel scales       (exact; H rescaled to match)
    stage 2: per group of linears sharing an input, in forward order:
                 H from the block with the earlier groups already quantized (sequential)
                 error-feedback ternary rounding <-> least-squares group scales
             Adam on log scales, norm weights, biases: block(x_q) -> y_fp
    x_q, x_fp = block(x_q), y_fp
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ternlm.config import QuantConfig, TernaryConfig
from ternlm.errors import TernlmError
from ternlm.nn.surgery import replace_module, select_targets
from ternlm.nn.ternary_linear import TernaryLinear
from ternlm.ptq.arch import BlockSpec, block_spec, get_weight
from ternlm.ptq.calibration import block_kwargs, block_stack, capture_block_inputs, run_block_batched
from ternlm.ptq.config import PTBitNetConfig
from ternlm.ptq.reconstruct import FakeTernaryLinear, block_loss, reconstruct_block
from ternlm.ptq.rounding import n_groups, quantize_layer
from ternlm.ptq.transform import transform_block
from ternlm.quant.activations import fake_quantize_activations

_BATCH = 4  # sequences per forward when streaming activations through a block


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], x: torch.Tensor, kwargs: dict,
                     act_bits: int | None = None) -> dict:
    """name -> H = sum_x x x^T (float64, (in, in)) of each named linear's input over the stream."""
    hs, handles = {}, []

    def make_hook(name):
        def hook(module, args):
            a = args[0].detach().float()
            if act_bits is not None:
                a = fake_quantize_activations(a, act_bits)
            a = a.reshape(-1, a.shape[-1])
            h = (a.t() @ a).double()
            hs[name] = hs[name] + h if name in hs else h
        return hook

    for n in names:
        handles.append(block.get_submodule(n).register_forward_pre_hook(make_hook(n)))
    try:
        run_block_batched(block, x, kwargs, _BATCH)
    finally:
        for hd in handles:
            hd.remove()
    return hs


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise TernlmError(f"non-finite values (NaN/inf) in {what}")


def _prepare(model: nn.Module, calib_ids: torch.Tensor, cfg: PTBitNetConfig):
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise TernlmError("calib_ids must be a LongTensor of shape (n_seq, seq_len)")
    need = cfg.n_seq * cfg.seq_len
    if calib_ids.shape[1] != cfg.seq_len or calib_ids.shape[0] < cfg.n_seq:
        raise TernlmError(f"calibration ids hold {calib_ids.shape[0]} x {calib_ids.shape[1]} tokens; need at "
                          f"least {need} tokens ({cfg.n_seq} sequences of seq_len={cfg.seq_len})")
    targets = select_targets(model, QuantConfig())
    if not targets:
        raise TernlmError(f"no quantizable linear layers in {type(model).__name__} (none inside transformer blocks)")
    for t in targets:
        _check_finite(model.get_submodule(t).weight, f"the weights of {t}")
    stack_name, blocks = block_stack(model, targets)
    return targets, stack_name, blocks, calib_ids[: cfg.n_seq]


def block_targets(targets: list[str], prefix: str) -> list[str]:
    return [t[len(prefix):] for t in targets if t.startswith(prefix)]


def _spec_for(block: nn.Module, names: list[str]) -> BlockSpec:
    spec = block_spec(block)
    if {n for g in spec.groups for n in g} != set(names):
        return BlockSpec("generic", [[n] for n in names])
    return spec


@torch.no_grad()
def apply_transform(model: nn.Module, calib_ids: torch.Tensor, cfg: PTBitNetConfig | None = None) -> dict:
    """Stage 1 alone, on the full-precision stream: the model computes the same function after."""
    cfg = cfg or PTBitNetConfig()
    targets, stack_name, blocks, ids = _prepare(model, calib_ids, cfg)
    x, kw = capture_block_inputs(model.eval(), blocks, ids)
    kws = block_kwargs(model, blocks, ids, kw)
    info = {}
    for bi, block in enumerate(blocks):
        names = block_targets(targets, f"{stack_name}.{bi}.")
        spec = _spec_for(block, names)
        if spec.migrations:
            hs = collect_hessians(block, names, x, kws[bi])
            info[bi] = transform_block(block, spec, hs, cfg.group_size)
        x = run_block_batched(block, x, kws[bi], _BATCH)
    return info


def _quantize_group(block, group, hs, cfg, layer_info, keep=()):
    for name in group:
        m = block.get_submodule(name)
        if name in keep:  # kept at int8 by a bits budget: rounded now, so that what follows sees it
            _round_int8_(m)
            layer_info[name] = "int8"
            continue
        codes, scale, info = quantize_layer(get_weight(m), hs[name], cfg.group_size, damp=cfg.damp,
                                            block_cols=cfg.block_cols, error_feedback=cfg.error_feedback,
                                            refit_iters=cfg.refit_iters, name=name)
        replace_module(block, name, FakeTernaryLinear(codes, scale, m.bias, cfg.group_size, cfg.act_bits))
        layer_info[name] = info["rel_err"]


@torch.no_grad()
def _round_int8_(m: nn.Module) -> None:
    """Round a linear's weight to int8 rows in place (the canonical int8 quantizer, per row)."""
    from ternlm.config import Int8Config
    from ternlm.nn.bitlinear import linear_weight_out_in
    from ternlm.quant.int8 import dequantize_int8, quantize_int8

    w = linear_weight_out_in(m)
    w.copy_(dequantize_int8(quantize_int8(w.float(), Int8Config("absmax", "per_channel"))).to(w.dtype))


def ptbitnet_quantize(model: nn.Module, calib_ids: torch.LongTensor, cfg: PTBitNetConfig | None = None, *,
                      progress: bool = True, pack: bool = True, kernel: str = "auto", keep=()) -> dict:
    """Quantize the model's block linears to ternary in place (PT-BitNet-style, no training).

    calib_ids: (n_seq, seq_len) token ids, at least ``cfg.n_seq`` rows of ``cfg.seq_len``.
    pack: True replaces each layer by a packed ``TernaryLinear``; False leaves the float
        fake-quantized ``FakeTernaryLinear`` (codes * scales, exactly the same numbers) in place,
        for layers the packed format cannot hold yet (a partial last group).
    keep: block linears a bits budget keeps at int8 (``ternlm.ptq.budget``): rounded to int8 rows
        at their turn (the layers after them calibrate against that) and, with pack, made
        ``Int8RowLinear``.
    Returns a record: wall time, peak RSS, per-block losses and layer errors, bits/weight, config.
    """
    cfg = cfg or PTBitNetConfig()
    t0 = time.perf_counter()
    targets, stack_name, blocks, ids = _prepare(model, calib_ids, cfg)
    keep = set(keep)
    unknown = keep - set(targets)
    if unknown:
        raise TernlmError(f"layers to keep at int8 are not block linears: {', '.join(sorted(unknown)[:3])}")
    model.eval()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_q, kw = capture_block_inputs(model, blocks, ids)
    kws = block_kwargs(model, blocks, ids, kw)
    _check_finite(x_q, "the activations entering the first transformer block")
    x_fp = x_q.clone()
    records = []
    bar = tqdm(list(enumerate(blocks)), desc="pt-bitnet", disable=not progress)
    for bi, block in bar:
        prefix = f"{stack_name}.{bi}."
        rec, x_q, x_fp = quantize_block(block, bi, block_targets(targets, prefix), x_q, x_fp, kws[bi], cfg, gen,
                                        prefix.rstrip("."), keep=block_targets(sorted(keep), prefix))
        if rec is not None:
            records.append(rec)
            bar.set_postfix(rel_loss=f"{rec['rel_loss']:.3g}")
    del x_q, x_fp

    n_w = n_s = 0
    for t in targets:
        m = model.get_submodule(t)
        if t in keep:
            if pack:
                from ternlm.nn.int8_linear import Int8RowLinear

                replace_module(model, t, Int8RowLinear.from_module(m, 8 if cfg.act_bits == 8 else None))
            continue
        n_w += m.in_features * m.out_features
        n_s += m.out_features * n_groups(m.in_features, cfg.group_size)
        if pack:
            pack_layer(model, t, cfg, kernel)
        else:
            m.requires_grad_(False)
    targets = [t for t in targets if t not in keep]
    from ternlm.moe.experts import expert_modules

    experts = expert_modules(model)
    for name in experts:
        w, s = expert_counts(model.get_submodule(name), cfg.group_size)
        n_w, n_s = n_w + w, n_s + s
        if pack:
            from ternlm.ptq.experts import pack_experts

            pack_experts(model, name, cfg, kernel)
    if experts:
        model.ternlm_experts = experts
    model.ternlm_quant_config = ptbitnet_quant_config(cfg)
    model.ternlm_targets = list(targets)
    model.ternlm_format = cfg.fmt
    model.ternlm_ptq_config = cfg.to_dict()
    return ptq_log(t0, len(targets), n_w, n_s, pack, records, cfg)


def ptq_log(t0: float, n_targets: int, n_w: int, n_s: int, packed: bool, records: list, cfg: PTBitNetConfig) -> dict:
    """The record of a pt-bitnet run (saved as ``ternlm_ptq.json`` beside the checkpoint)."""
    from ternlm.eval.cost import peak_rss_mb

    return {
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        "n_targets": n_targets,
        "n_weights": n_w,
        "bits_per_weight": {"fp32_scales": (2 * n_w + 32 * n_s) / n_w, "fp16_scales": (2 * n_w + 16 * n_s) / n_w},
        "packed": packed,
        "blocks": records,
        "config": cfg.to_dict(),
    }


def expert_counts(experts: nn.Module, group_size: int) -> tuple[int, int]:
    """(weights, group scales) of a 3-D expert module (float or ``TernaryExperts``)."""
    from ternlm.moe.experts import expert_dims

    hidden, inter = expert_dims(experts)
    n_w = n_s = 0
    for out_f, in_f in ((2 * inter, hidden), (hidden, inter)):
        n_w += experts.num_experts * out_f * in_f
        n_s += experts.num_experts * out_f * n_groups(in_f, group_size)
    return n_w, n_s


def ptbitnet_quant_config(cfg: PTBitNetConfig) -> QuantConfig:
    """The quantization config a pt-bitnet checkpoint records (group scales fitted, every block linear)."""
    return QuantConfig(weights=TernaryConfig(granularity="per_group", group_size=cfg.group_size, scale_mode="fit",
                                             act_bits=cfg.act_bits))


def pack_layer(root: nn.Module, name: str, cfg: PTBitNetConfig, kernel: str = "auto") -> None:
    """Replace the calibrated ``FakeTernaryLinear`` ``name`` under ``root`` by a packed ``TernaryLinear``."""
    m = root.get_submodule(name)
    m.requires_grad_(False)
    try:
        new = TernaryLinear.from_ternary(m.ternary(), m.bias, cfg.act_bits, cfg.fmt, kernel)
    except TernlmError as e:
        raise TernlmError(f"cannot pack {name} as TernaryLinear ({e}); use pack=False for the float "
                          "fake-quantized layers") from None
    replace_module(root, name, new)


def quantize_block(block: nn.Module, bi: int, names: list[str], x_q: torch.Tensor, x_fp: torch.Tensor, kw: dict,
                   cfg: PTBitNetConfig, gen: torch.Generator, where: str, keep=()):
    """Stage 1 + 2 on one block (its linears ``names``, relative to the block) in place.

    x_q / x_fp: the quantized and full-precision streams entering the block. Returns
    (record or None when the block has no targets, x_q, x_fp) for the next block. The in-memory
    and the streaming runs both go through here, so they compute the same numbers.
    """
    if not names:
        return None, run_block_batched(block, x_q, kw, _BATCH), run_block_batched(block, x_fp, kw, _BATCH)
    spec = _spec_for(block, names)
    y_fp = run_block_batched(block, x_fp, kw, _BATCH)
    _check_finite(y_fp, f"the full-precision output of block {where}")
    hs = collect_hessians(block, names, x_q, kw, cfg.act_bits)
    rec = {"block": bi, "kind": spec.kind, "layers": {}}
    if cfg.transform and spec.migrations:
        rec["transform"] = transform_block(block, spec, hs, cfg.group_size)
    for gi, group in enumerate(spec.groups):
        if gi > 0 and cfg.sequential:
            hs.update(collect_hessians(block, group, x_q, kw, cfg.act_bits))
        _quantize_group(block, group, hs, cfg, rec["layers"], keep)
    from ternlm.moe.experts import expert_modules

    for name in expert_modules(block):  # mixture of experts: routed-token Hessians per expert
        from ternlm.ptq.experts import quantize_experts

        quantize_experts(block, name, x_q, kw, cfg, rec.setdefault("experts", {}))
    if cfg.reconstruct and cfg.reconstruct_steps > 0:
        losses, x_q = reconstruct_block(block, x_q, y_fp, kw, steps=cfg.reconstruct_steps, lr=cfg.lr,
                                        batch=cfg.reconstruct_batch, generator=gen)
    else:
        loss, x_q = block_loss(block, x_q, y_fp, kw, _BATCH)
        losses = {"loss_before": loss, "loss_after": loss}
    rec.update(losses)
    rec["rel_loss"] = losses["loss_after"] / max(float(y_fp.pow(2).mean()), 1e-30)
    _check_finite(x_q, f"the quantized output of block {where}")
    return rec, x_q, y_fp
