"""Stage 1: function-preserving per-channel scale migration, folded into the stored weights.

For a migration with per-channel scales s (see ``arch``), the consumer's input channel c is
divided by s[c] upstream (norm weight/bias, or producer rows/bias) and its weight column is
multiplied by s[c], so the block computes exactly the same function in full precision and the
input Hessian becomes H / (s s^T). The migration is chosen to make the consumer's weights easier
to ternarize: s = a^alpha / w^beta (a: RMS input of the channel from calibration, w: mean |W| of
its column), normalised to geometric mean 1, with (alpha, beta) from a small grid picked by the
proxy output error tr(D H' D^T) of plain group-wise ternary rounding. (0, 0) is the identity, so
the proxy never gets worse.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternlm.ptq.arch import BlockSpec, NormMigration, get_weight, set_weight
from ternlm.ptq.rounding import expand_groups, layer_error, search_group_scales, ternary_codes

ALPHAS = (0.0, 0.25)
BETAS = (0.0, 0.25, 0.5, 0.75)


def _rtn_error(ws: list, h: torch.Tensor, group_size: int) -> float:
    diag = torch.diagonal(h).float().clamp_min(0)
    err = 0.0
    for w in ws:
        s = search_group_scales(w, group_size, diag, n_grid=8)
        err += layer_error(w, ternary_codes(w, expand_groups(s, w.shape[1], group_size))
                           * expand_groups(s, w.shape[1], group_size), h)
    return err


def choose_scales(ws: list, h: torch.Tensor, col_map: torch.Tensor, n_s: int, group_size: int) -> tuple[torch.Tensor, dict]:
    """Pick s (n_s,) for consumer weights ``ws`` (each (out, in)) with input Hessian ``h``."""
    hd = torch.diagonal(h).float().clamp_min(0)
    cnt = torch.bincount(col_map, minlength=n_s).float().clamp_min(1)
    a = (torch.zeros(n_s).index_add_(0, col_map, hd) / cnt).sqrt()
    wabs = torch.cat([w.abs() for w in ws], 0).mean(0)
    wm = torch.zeros(n_s).index_add_(0, col_map, wabs) / cnt
    live = (a > 0) & (wm > 0)
    a = torch.where(live, a, a[live].mean() if live.any() else torch.ones(()))
    wm = torch.where(live, wm, wm[live].mean() if live.any() else torch.ones(()))
    best = None
    for alpha in ALPHAS:
        for beta in BETAS:
            s = a.pow(alpha) / wm.pow(beta)
            s = (s / s.log().mean().exp()).clamp(1e-2, 1e2)
            sc = s[col_map]
            err = _rtn_error([w * sc for w in ws], h / (sc[:, None] * sc[None, :]).double(), group_size)
            if best is None or err < best[0]:
                best = (err, s, alpha, beta)
    ident = _rtn_error(ws, h, group_size)
    return best[1], {"alpha": best[2], "beta": best[3], "proxy_gain": ident / max(best[0], 1e-30)}


def fold(block: nn.Module, mig, s: torch.Tensor) -> None:
    """Apply migration ``mig`` with scales ``s`` to the block's weights (exact in full precision)."""
    with torch.no_grad():
        if isinstance(mig, NormMigration):
            norm = block.get_submodule(mig.norm)
            norm.weight.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
            for name in mig.linears:
                m = block.get_submodule(name)
                set_weight(m, get_weight(m) * s[None, :])
            return
        prod = block.get_submodule(mig.producer)
        w = get_weight(prod)
        w[mig.rows] /= s[:, None]
        set_weight(prod, w)
        if prod.bias is not None:
            prod.bias[mig.rows] /= s.to(prod.bias.dtype)
        cons = block.get_submodule(mig.consumer)
        set_weight(cons, get_weight(cons) * s[mig.col_map][None, :])


def _consumer(mig) -> tuple[list, torch.Tensor, int]:
    if isinstance(mig, NormMigration):
        return mig.linears, None, 0
    return [mig.consumer], mig.col_map, len(mig.rows)


def transform_block(block: nn.Module, spec: BlockSpec, hessians: dict, group_size: int) -> dict:
    """Choose and fold every migration of the block; rescales ``hessians`` (name -> H) in place
    to the new inputs. Returns per-migration info."""
    info = {}
    for mig in spec.migrations:
        names, col_map, n_s = _consumer(mig)
        h = hessians[names[0]]
        if col_map is None:
            col_map, n_s = torch.arange(h.shape[0]), h.shape[0]
        ws = [get_weight(block.get_submodule(n)) for n in names]
        s, rec = choose_scales(ws, h, col_map, n_s, group_size)
        fold(block, mig, s)
        sc = s[col_map].double()
        for n in names:
            hessians[n] = hessians[n] / (sc[:, None] * sc[None, :])
        info[mig.norm if isinstance(mig, NormMigration) else f"{mig.producer}->{mig.consumer}"] = rec
    return info
