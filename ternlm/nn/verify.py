"""Verification report: are the layers that should be ternary really ternary?

The check looks only at the weight a layer actually multiplies by (BitLinear's effective weight,
a packed layer's dequantized weight, or a plain layer's weight) and asks, per scale group, whether
every entry is 0 or +-s with s the group's largest magnitude. It does not trust module types, so a
layer left in float, a BitLinear mid lambda-warm-up, or a corrupted checkpoint is caught.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ternlm.nn.bitlinear import BitLinear, linear_weight_out_in

LOG2_3 = math.log2(3)


@dataclass
class LayerReport:
    name: str
    module: str
    n_weights: int
    ternary_share: float
    zeros_share: float
    n_scales: int
    scale_mean: float
    scale_min: float
    scale_max: float
    bits_per_weight: float          # information content: log2(3) + scale overhead, or float bits
    storage_bits_per_weight: float  # as stored: 2-bit packing + scales, or the dtype's bits
    ok: bool


@dataclass
class VerifyReport:
    layers: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.layers) and all(l.ok for l in self.layers)

    @property
    def failed(self) -> list:
        return [l.name for l in self.layers if not l.ok]

    def totals(self) -> dict:
        n = sum(l.n_weights for l in self.layers)
        if n == 0:
            return {"n_layers": 0, "n_weights": 0}
        w = lambda attr: sum(getattr(l, attr) * l.n_weights for l in self.layers) / n  # noqa: E731
        return {"n_layers": len(self.layers), "n_weights": n, "ternary_share": w("ternary_share"),
                "zeros_share": w("zeros_share"), "bits_per_weight": w("bits_per_weight"),
                "storage_bits_per_weight": w("storage_bits_per_weight"),
                "layers_failed": len(self.failed), "ok": self.ok}

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "layers": [asdict(l) for l in self.layers]}

    def format(self, max_rows: int = 200) -> str:
        hdr = f"{'layer':<42} {'module':<14} {'weights':>10} {'ternary%':>9} {'zeros%':>7} {'scale':>9} {'bits/w':>7}  ok"
        rows = [hdr, "-" * len(hdr)]
        for l in self.layers[:max_rows]:
            rows.append(f"{l.name[-42:]:<42} {l.module[:14]:<14} {l.n_weights:>10,} {100 * l.ternary_share:>8.2f}% "
                        f"{100 * l.zeros_share:>6.2f}% {l.scale_mean:>9.4g} {l.bits_per_weight:>7.3f}  "
                        f"{'yes' if l.ok else 'NO'}")
        if len(self.layers) > max_rows:
            rows.append(f"... {len(self.layers) - max_rows} more layers")
        t = self.totals()
        if t["n_weights"]:
            rows.append("-" * len(hdr))
            rows.append(f"total: {t['n_layers']} layers, {t['n_weights']:,} weights, "
                        f"{100 * t['ternary_share']:.2f}% ternary, {100 * t['zeros_share']:.2f}% zeros, "
                        f"{t['bits_per_weight']:.3f} bits/weight ({t['storage_bits_per_weight']:.3f} stored); "
                        + (("all layers ternary" if not any(l.module == "int8 (budget)" for l in self.layers)
                            else "every other layer ternary, int8 ones kept by the bits budget")
                           if self.ok else f"NOT TERNARY: {', '.join(self.failed)}"))
        return "\n".join(rows)


def effective_weight(m: nn.Module) -> torch.Tensor:
    if isinstance(m, BitLinear):
        return m.effective_weight().detach()
    if hasattr(m, "dequantize_weight"):
        return m.dequantize_weight().detach()
    return linear_weight_out_in(m).detach()


def _group_max(w: torch.Tensor, granularity: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest |w| of every scale's group, flat; the same broadcast to w's (out, in) shape).

    per_group takes groups of ``group_size`` inputs along each row, the last one possibly partial.
    """
    from ternlm.quant.ternary import expand_scale, n_groups

    out_f, in_f = w.shape
    a = w.abs()
    if granularity == "per_group":
        pad = n_groups(in_f, group_size) * group_size - in_f
        s = torch.nn.functional.pad(a, (0, pad)).reshape(out_f, -1, group_size).amax(-1)  # (out, G)
        return s.reshape(-1), expand_scale(s, w.shape, "per_group", group_size)
    if granularity == "per_tensor":
        s = a.amax().reshape(1)
        return s, s.reshape(1, 1).expand(out_f, in_f)
    s = a.amax(dim=1)  # per output row; a per-tensor ternary weight passes this too
    return s, s.reshape(out_f, 1).expand(out_f, in_f)


@torch.no_grad()
def check_layer(name: str, m: nn.Module, rtol: float = 1e-5) -> LayerReport:
    cfg = getattr(m, "config", None)  # BitLinear; a packed TernaryLinear carries its own fields
    gran = getattr(cfg, "granularity", None) or getattr(m, "granularity", "per_channel")
    gsize = getattr(cfg, "group_size", None) or getattr(m, "group_size", 128)
    param = getattr(m, "weight", None)
    return _check_matrix(name, type(m).__name__, effective_weight(m).float(), gran, gsize,
                         param.dtype if param is not None and param.is_floating_point() else None, rtol)


def _check_matrix(name: str, kind: str, w: torch.Tensor, gran: str, gsize: int, dtype, rtol: float) -> LayerReport:
    # NOTE: a block of rows at a time (4M weights), so the temporaries are a fraction of the weight:
    # streaming quantization's model card checks a layer of a model larger than memory.
    out_f, in_f = w.shape
    step = max(1, (1 << 22) // max(1, in_f))
    blocks = [w[r:r + step] for r in range(0, out_f, step)]
    if gran == "per_tensor":
        top = torch.stack([b.abs().amax() for b in blocks]).amax().reshape(1) if out_f else w.new_zeros(1)
        svs = [top]
    else:
        svs = []
    n_zero = n_tern = 0
    for b in blocks:
        if gran == "per_tensor":
            s = top.reshape(1, 1).expand_as(b)
        else:
            sv_b, s = _group_max(b, gran, gsize)
            svs.append(sv_b)
        a = b.abs()
        is_zero = a == 0
        n_zero += int(is_zero.sum())
        n_tern += int((is_zero | ((a - s).abs_() <= rtol * s)).sum())
    sv = torch.cat(svs) if svs else w.new_zeros(1)
    n, n_scales = w.numel(), sv.numel()
    tern, zeros = n_tern / max(1, n), n_zero / max(1, n)
    ok = n_tern == n
    if ok:
        overhead = 32.0 * n_scales / n
        bits, stored = LOG2_3 + overhead, 2.0 + overhead
    else:
        bits = stored = float(torch.finfo(dtype).bits if dtype is not None else 8)
    return LayerReport(name, kind, n, tern, zeros, n_scales, sv.mean().item(), sv.min().item(),
                       sv.max().item(), bits, stored, ok)


@torch.no_grad()
def check_experts(name: str, m: nn.Module, rtol: float = 1e-5) -> list[LayerReport]:
    """One report per expert matrix of a packed ``TernaryExperts`` (``name[e].gate_up`` / ``.down``)."""
    w = m.dequantize()
    rows = []
    for which in ("gate_up", "down"):
        for e in range(m.num_experts):
            rows.append(_check_matrix(f"{name}[{e}].{which}", type(m).__name__, w[which + "_proj"][e].t().float(),
                                      m.granularity, m.group_size, None, rtol))
    return rows


def verify(model: nn.Module, targets: list[str] | None = None) -> VerifyReport:
    """Check the layers meant to be ternary: ``targets`` or those recorded by ``quantize_model``,
    else the linear layers of the transformer blocks; packed mixture-of-experts modules
    (``TernaryExperts``) are reported expert by expert."""
    from ternlm.nn.surgery import block_linear_layers

    if targets is None:
        targets = getattr(model, "ternlm_targets", None) or block_linear_layers(model)
    return VerifyReport([r for n, m, check in _checked_modules(model, targets) for r in check(n, m)])


def verify_by_module(model: nn.Module, targets: list[str], load) -> VerifyReport:
    """``verify`` of a model whose weights are not in memory (built on the meta device): each
    checked module is filled by ``load(name, module)``, checked, and emptied again, so memory holds
    one layer at a time (a streamed checkpoint's model card)."""
    from ternlm.eval.cost import release_freed_memory

    rows = []
    for n, m, check in _checked_modules(model, targets):
        load(n, m)
        rows.extend(check(n, m))
        m.to("meta")
        release_freed_memory(collect=False)  # else glibc's fragmented heap grows layer by layer
    return VerifyReport(rows)


def _checked_modules(model: nn.Module, targets: list[str]) -> list:
    """(name, module, check) of every module ``verify`` reports, check(name, module) -> rows."""
    from ternlm.moe.experts import ternary_experts

    from ternlm.nn.int8_linear import Int8RowLinear

    out = [(n, model.get_submodule(n), lambda n, m: [check_layer(n, m)]) for n in targets]
    out += [(n, m, check_experts) for n, m in ternary_experts(model)]
    # layers a bits budget kept at int8: reported, counted as not ternary
    out += [(n, m, lambda n, m: [int8_row(n, m)]) for n, m in model.named_modules()
            if isinstance(m, Int8RowLinear) and n not in targets]
    return out


@torch.no_grad()
def int8_row(name: str, m: nn.Module) -> LayerReport:
    """The report row of an ``Int8RowLinear`` (kept at int8 on purpose: ok, 0% ternary)."""
    n = m.in_features * m.out_features
    q = m.qweight
    bits = 8.0 + 32.0 * m.out_features / n
    return LayerReport(name, "int8 (budget)", n, 0.0, (q == 0).float().mean().item(), m.out_features,
                       m.scale.mean().item(), m.scale.min().item(), m.scale.max().item(), bits, bits, True)
