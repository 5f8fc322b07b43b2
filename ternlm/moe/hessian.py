"""Routed-token input Hessians for calibrated PTQ of experts (GPTQ-style error feedback).

An expert sees only the tokens the router sends it, so its input second moment is

    H_e = sum over tokens t routed to e of  w_te * x_t x_t^T      (w_te: the routing score)

accumulated over calibration batches, then damped (``damp`` x mean diagonal). An expert that saw
fewer than ``min_tokens`` tokens has no usable Hessian: ``finalize`` returns None for it and the
caller falls back to plain absmean rounding.

``ternlm.ptq.experts`` uses it for pt-bitnet on mixture-of-experts blocks.
"""

from __future__ import annotations

import torch


class RoutedHessian:
    """Accumulates one (in, in) float64 Hessian per expert from routed tokens only."""

    def __init__(self, num_experts: int, in_features: int):
        self.h = torch.zeros(num_experts, in_features, in_features, dtype=torch.float64)
        self.tokens = torch.zeros(num_experts, dtype=torch.long)
        self.weight = torch.zeros(num_experts, dtype=torch.float64)

    def add(self, x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor) -> None:
        """x (T, in); router_indices, routing_weights (T, k) as the router returns them."""
        x = x.reshape(-1, x.shape[-1]).double()
        for e in torch.unique(router_indices).tolist():
            if e >= self.h.shape[0]:
                continue
            tok, pos = torch.where(router_indices == e)
            self.add_expert(e, x[tok], routing_weights[tok, pos])

    def add_expert(self, e: int, xs: torch.Tensor, w: torch.Tensor) -> None:
        """Tokens xs (n, in) already routed to expert e, with their routing scores w (n,)."""
        xs, w = xs.reshape(-1, xs.shape[-1]).double(), w.reshape(-1).double()
        self.h[e] += (xs * w[:, None]).T @ xs
        self.tokens[e] += xs.shape[0]
        self.weight[e] += w.sum()

    def finalize(self, damp: float = 0.01, min_tokens: int = 16) -> list[torch.Tensor | None]:
        """Per expert: the damped, score-normalised Hessian (float32), or None (absmean fallback)."""
        out = []
        for e in range(self.h.shape[0]):
            if self.tokens[e] < min_tokens or self.weight[e] <= 0:
                out.append(None)
                continue
            h = self.h[e] / self.weight[e]
            h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
            out.append(h.float())
        return out
