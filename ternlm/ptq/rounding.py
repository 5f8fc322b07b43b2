"""Ternary rounding of one linear layer against its input Hessian.

Weights are (out, in) float32; groups are ``group_size`` consecutive inputs of a row, the last one
possibly partial, so a scale tensor is (out, n_groups) with n_groups = ceil(in / group_size).

    H = sum_x x x^T over calibration inputs (in, in); the layer's output error for a weight error
    D is tr(D H D^T) = ||X D^T||^2.

``gptq_ternary`` is the error-feedback rounding (GPTQ/OBQ): columns are rounded left to right
inside blocks, each column's rounding error divided by its diagonal of the inverse Hessian's
Cholesky factor and pushed onto the columns not yet rounded. ``fit_scales`` is the least-squares
scale per group for fixed codes, against the output error (uses H). The two alternate.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.quant.ternary import expand_scale, n_groups, ternarize  # noqa: F401 (n_groups re-exported)


def expand_groups(scale: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(out, n_groups) -> (out, in); the last group may be partial (the canonical ``expand_scale``)."""
    return expand_scale(scale, (scale.shape[0], in_features), "per_group", group_size)


def group_ids(in_features: int, group_size: int) -> torch.Tensor:
    return torch.arange(in_features) // group_size


def ternary_codes(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RoundClip(w / s, -1, 1) (float, for fake quantization)."""
    return torch.round(w / s).clamp_(-1, 1)


def absmean_grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet absmean per group (the naive baseline): float codes, scales (out, n_groups); the canonical
    quantizer (``ternlm.quant.ternary.ternarize``), per group."""
    t = ternarize(w, TernaryConfig(granularity="per_group", group_size=group_size))
    return t.codes.float(), t.scale


def search_scales(w: torch.Tensor, weight: torch.Tensor | None = None, n_grid: int = 16) -> torch.Tensor:
    """Per-row scale of ``w`` (out, k) minimising the (diag-weighted) ternary rounding error.

    Candidate thresholds are multiples of mean|w| (0.3 to 2.0, halved); for each the codes are
    re-rounded and the least-squares scale for those codes taken, whose error is
    sum h|w|^2 - num^2 / den (num = sum h|w||t|, den = sum h|t|), so only the last term is compared.
    Returns (out,) float32.
    """
    a = w.abs()
    h = torch.ones(w.shape[1]) if weight is None else weight.float()
    ah = a * h
    base = a.mean(dim=1, keepdim=True).clamp_min(1e-8)  # (out, 1)
    best_gain = torch.full((w.shape[0],), -1.0)
    best_s = base.squeeze(1).clone()
    for c in torch.linspace(0.3, 2.0, n_grid).tolist():
        t = a >= (0.5 * c) * base  # |code| for threshold s/2
        num = torch.where(t, ah, 0).sum(1)
        den = (t.float() @ h)
        ok = den > 0
        gain = torch.where(ok, num * num / den.clamp_min(1e-30), -1.0)
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_s = torch.where(better & ok, num / den.clamp_min(1e-30), best_s)
    return best_s.clamp_min(1e-8)


def search_group_scales(w: torch.Tensor, group_size: int, weight: torch.Tensor | None = None,
                        n_grid: int = 16) -> torch.Tensor:
    """``search_scales`` for every group of every row at once: (out, n_groups)."""
    out_f, in_f = w.shape
    g = n_groups(in_f, group_size)
    pad = g * group_size - in_f
    h = torch.ones(in_f) if weight is None else weight.float()
    wp = F.pad(w, (0, pad)).reshape(out_f * g, group_size)
    hp = F.pad(h, (0, pad)).reshape(g, group_size)
    if pad:  # rows of different groups have different weights: fold h into a per-row layout
        a = wp.abs()
        hr = hp.repeat(out_f, 1)
        base = a.sum(1, keepdim=True) / torch.full((g,), float(group_size)).index_fill_(
            0, torch.tensor([g - 1]), float(group_size - pad)).repeat(out_f)[:, None]
        base = base.clamp_min(1e-8)
        ah = a * hr
        best_gain = torch.full((out_f * g,), -1.0)
        best_s = base.squeeze(1).clone()
        for c in torch.linspace(0.3, 2.0, n_grid).tolist():
            t = a >= (0.5 * c) * base
            num = torch.where(t, ah, 0).sum(1)
            den = torch.where(t, hr, 0).sum(1)
            ok = den > 0
            gain = torch.where(ok, num * num / den.clamp_min(1e-30), -1.0)
            better = gain > best_gain
            best_gain = torch.where(better, gain, best_gain)
            best_s = torch.where(better & ok, num / den.clamp_min(1e-30), best_s)
        return best_s.clamp_min(1e-8).reshape(out_f, g)
    return torch.stack([search_scales(w[:, i:i + group_size], h[i:i + group_size], n_grid)
                        for i in range(0, in_f, group_size)], dim=1)


def prepare_hessian(h: torch.Tensor, w: torch.Tensor, damp: float, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Damped copy of H with dead input channels (zero diagonal) made harmless.

    Returns (H, dead) where dead channels get H_jj = 1 and their weights are to be zeroed (they
    never see a non-zero input, so any value computes the same).
    """
    if not torch.isfinite(h).all():
        raise TernlmError(f"non-finite calibration activations (NaN/inf) at the input of {name}")
    h = h.double().clone()
    d = torch.diagonal(h)
    dead = d <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    d[dead] = 1
    mean = d[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=h.dtype)
    d += damp * mean
    return h, dead


def _inverse_cholesky(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float64 in, float32 out), adding damping if H is singular."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    mean = torch.diagonal(h).mean()
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(h + extra * mean * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return U.float()
        extra = max(extra * 10, 1e-4)
    raise TernlmError(f"the input Hessian of {name} is not positive definite even after damping")


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)^T): the summed squared output error over the calibration inputs."""
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())


def gptq_ternary(w: torch.Tensor, u: torch.Tensor, group_size: int, block_cols: int,
                 scale: torch.Tensor | None = None, error_feedback: bool = True,
                 h_diag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-to-right rounding pass.

    w (out, in) float32; u: upper Cholesky factor of H^-1; scale (out, n_groups) fixed scales, or
    None to choose each group's scale when its first column is reached, from the weights as
    updated by the error feedback so far. Returns codes (out, in) float in {-1,0,1} and scales.
    """
    w = w.clone()
    out_f, in_f = w.shape
    g = n_groups(in_f, group_size)
    lazy = scale is None
    scale = torch.zeros(out_f, g) if lazy else scale.clone()
    codes = torch.zeros_like(w)
    # blocks of columns aligned to groups, so a group's scale is chosen inside one block
    bc = max(group_size, (block_cols // group_size) * group_size) if group_size <= block_cols else group_size
    hd = h_diag if h_diag is not None else torch.ones(in_f)
    for i1 in range(0, in_f, bc):
        i2 = min(i1 + bc, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // group_size
            if lazy and col % group_size == 0:
                ge = min(i + group_size, i2 - i1)
                scale[:, gi] = search_scales(w1[:, i:ge], hd[col:col + ge - i])
            s = scale[:, gi]
            q = ternary_codes(w1[:, i], s)
            codes[:, col] = q
            if error_feedback:
                e = (w1[:, i] - q * s) / u1[i, i]
                w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
                err1[:, i] = e
        if error_feedback and i2 < in_f:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, scale


def fit_scales(w: torch.Tensor, codes: torch.Tensor, h: torch.Tensor, group_size: int,
               old: torch.Tensor) -> torch.Tensor:
    """Least-squares group scales for fixed codes against the output error tr(D H D^T).

    Per row r the scales solve M_r s = b_r with M_r[g, g'] = c_g^T H_gg' c_g' and b_r[g] =
    c_g^T (H w_r)_g. Groups with no non-zero code keep their old scale; scales stay positive.
    """
    out_f, in_f = w.shape
    g = n_groups(in_f, group_size)
    hf = h.double()
    c = codes.double()
    m = torch.zeros(out_f, g, g, dtype=torch.float64)
    for gj in range(g):
        sl = slice(gj * group_size, min((gj + 1) * group_size, in_f))
        t = c[:, sl] @ hf[sl, :]  # (out, in): c_g'^T H_g', all columns
        prod = c * t
        m[:, :, gj] = torch.zeros(out_f, g, dtype=torch.float64).index_add_(1, group_ids(in_f, group_size), prod)
    b = torch.zeros(out_f, g, dtype=torch.float64).index_add_(1, group_ids(in_f, group_size), c * (w.double() @ hf))
    empty = torch.diagonal(m, dim1=1, dim2=2) <= 0
    ridge = 1e-9 * torch.diagonal(m, dim1=1, dim2=2).abs().mean().clamp_min(1e-30)
    m = m + torch.diag_embed(torch.where(empty, torch.ones_like(b), torch.full_like(b, float(ridge))))
    b = torch.where(empty, old.double(), b)
    s = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1).float()
    floor = 1e-3 * old.abs().mean().clamp_min(1e-8)
    s = torch.where(torch.isfinite(s) & (s > floor), s, old)
    return s


def quantize_layer(w: torch.Tensor, h: torch.Tensor, group_size: int, *, damp: float = 0.01,
                   block_cols: int = 128, error_feedback: bool = True, refit_iters: int = 2,
                   name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Ternary codes (out, in) and scales (out, n_groups) for one layer; alternates rounding
    and least-squares scales, keeping the pass with the lowest output error.

    Returns (codes float, scale float32, info) with info the output errors relative to ||X W^T||^2.
    """
    if not torch.isfinite(w).all():
        raise TernlmError(f"non-finite weights (NaN/inf) in {name}")
    hd, dead = prepare_hessian(h, w, damp, name)
    w = w.float().clone()
    w[:, dead] = 0
    u = _inverse_cholesky(hd, name) if error_feedback else None
    diag = torch.diagonal(hd).float()
    ref = max(float(((w.double() @ hd) * w.double()).sum()), 1e-30)
    best = None
    scale = None
    history = []
    for it in range(refit_iters + 1):
        if error_feedback:
            codes, scale = gptq_ternary(w, u, group_size, block_cols, scale, True, diag)
        else:
            if scale is None:
                scale = search_group_scales(w, group_size, diag)
            codes = ternary_codes(w, expand_groups(scale, w.shape[1], group_size))
        scale = fit_scales(w, codes, hd, group_size, scale)
        err = layer_error(w, codes * expand_groups(scale, w.shape[1], group_size), hd) / ref
        history.append(err)
        if best is None or err < best[0]:
            best = (err, codes, scale)
    return best[1], best[2], {"rel_err": best[0], "history": history}
