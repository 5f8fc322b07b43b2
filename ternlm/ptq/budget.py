"""A bits budget: keep the block linears that matter most at int8, the rest ternary, within B bits per weight.

    plan = plan_budget(model, calib_ids, budget_bpw=3.0, ternary=TernaryConfig(granularity="per_group",
                                                                                group_size=64), fmt="2bit")
    plan.int8        # the layers to keep at int8 rows, most sensitive first

Bits per weight are those of the block linears as stored, scales included: a ternary layer's
packed code rows (padded as the format pads them) and float32 scales, an int8 layer's rows and
one float32 scale per row, over the number of weights. Embeddings and the head are not part of
the budget (they are stored as ``--embed-dtype`` says) and the plan reports the whole file apart.

Sensitivity of a layer: how far the model's next-token distribution moves (KL from the
full-precision model, in nats per token, on calibration tokens) when that layer alone is
ternarized, every other layer left in full precision. The solver then takes layers in order of
sensitivity per extra bit (int8 minus ternary), keeping each one that still fits the budget, so
the result never exceeds B and no layer left ternary would still fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError


def int8_layer_bytes(out_f: int, in_f: int) -> int:
    """Bytes of an (out_f, in_f) int8 layer as stored: int8 rows + one float32 scale per row."""
    return out_f * in_f + 4 * out_f


@dataclass
class BudgetPlan:
    """budget_bpw: asked for; bpw: reached (block linears, scales included); int8: layers kept at
    int8 (most sensitive first); sensitivity: per layer, KL in nats/token when it alone is ternary."""

    budget_bpw: float
    bpw: float
    ternary_bpw: float
    int8: list = field(default_factory=list)
    sensitivity: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    calib_tokens: int = 0

    @property
    def ternary_share(self) -> float:
        n = sum(self.weights.values())
        return 1.0 - sum(self.weights[k] for k in self.int8) / n if n else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ternary_share"] = self.ternary_share
        return d


def solve_budget(shapes: dict[str, tuple[int, int]], sensitivity: dict[str, float], budget_bpw: float,
                 ternary_bytes, int8_bytes=int8_layer_bytes) -> tuple[list[str], float, float]:
    """The layers to keep at int8 for ``budget_bpw`` bits per weight over ``shapes`` (name -> (out, in)).

    ``ternary_bytes(out, in)`` / ``int8_bytes(out, in)``: stored bytes of a layer. Greedy by
    sensitivity per extra bit, each layer kept when it still fits. Returns (int8 layers in the order
    taken, bits per weight reached, bits per weight all-ternary). A budget below the all-ternary size
    is a TernlmError."""
    if not shapes:
        raise TernlmError("no layers to budget")
    n = sum(o * i for o, i in shapes.values())
    tern = {k: 8 * ternary_bytes(o, i) for k, (o, i) in shapes.items()}
    extra = {k: 8 * int8_bytes(o, i) - tern[k] for k, (o, i) in shapes.items()}
    base = sum(tern.values())
    if budget_bpw * n < base - 1e-9:
        raise TernlmError(f"a budget of {budget_bpw:g} bits per weight is below the all-ternary size of these "
                          f"layers ({base / n:.3f} bits per weight, scales included)")
    room = budget_bpw * n - base
    order = sorted(shapes, key=lambda k: (-sensitivity.get(k, 0.0) / max(extra[k], 1), k))
    keep = []
    for k in order:
        if extra[k] <= room + 1e-9:
            keep.append(k)
            room -= extra[k]
    bits = base + sum(extra[k] for k in keep)
    return keep, bits / n, base / n


@torch.no_grad()
def layer_sensitivity(model: nn.Module, calib_ids: torch.Tensor, targets: list[str], ternary: TernaryConfig,
                      progress: bool = True) -> dict[str, float]:
    """KL(full precision || model with only that layer ternary), nats per token, for each target."""
    from ternlm.nn.bitlinear import conv1d_class, linear_weight_out_in
    from ternlm.quant.ternary import ternarize

    conv = conv1d_class()
    model.eval()
    ref = F.log_softmax(model(input_ids=calib_ids).logits.float(), -1)  # (B, T, V)
    out = {}
    for name in tqdm(targets, desc="layer sensitivity", disable=not progress, dynamic_ncols=True):
        m = model.get_submodule(name)
        w = m.weight
        kept = w.data.clone()
        wq = ternarize(linear_weight_out_in(m).float(), ternary).dequantize()
        w.data.copy_((wq.t() if conv is not None and isinstance(m, conv) else wq).to(w.dtype))  # Conv1D: (in, out)
        try:
            lp = F.log_softmax(model(input_ids=calib_ids).logits.float(), -1)
            kl = F.kl_div(lp, ref, log_target=True, reduction="sum") / lp[..., 0].numel()
            out[name] = max(float(kl), 0.0)
        finally:
            w.data.copy_(kept)
    return out


def plan_budget(model: nn.Module, calib_ids: torch.Tensor, budget_bpw: float, ternary: TernaryConfig,
                fmt: str = "2bit", targets: list[str] | None = None, progress: bool = True) -> BudgetPlan:
    """Measure every target's sensitivity on ``calib_ids`` and solve the budget (see the module doc)."""
    from ternlm.config import QuantConfig
    from ternlm.nn.bitlinear import linear_weight_out_in
    from ternlm.nn.surgery import select_targets
    from ternlm.quant.pack import ternary_layer_bytes

    targets = targets or select_targets(model, QuantConfig(weights=ternary))
    shapes = {t: tuple(linear_weight_out_in(model.get_submodule(t)).shape) for t in targets}
    sens = layer_sensitivity(model, calib_ids, targets, ternary, progress)
    keep, bpw, base = solve_budget(
        shapes, sens, budget_bpw,
        lambda o, i: ternary_layer_bytes(o, i, fmt, ternary.granularity, ternary.group_size))
    return BudgetPlan(budget_bpw, bpw, base, keep, sens, {k: o * i for k, (o, i) in shapes.items()},
                      int(calib_ids.numel()))
