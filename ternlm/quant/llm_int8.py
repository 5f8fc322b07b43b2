"""LLM.int8() (Dettmers et al., 2022) in plain PyTorch, and the bitsandbytes probe.

Weights are stored once, as vector-wise int8 (one absmax scale per output row, from
``ternlm.quant.int8``'s one absmax quantizer). At run time the
input feature columns whose magnitude exceeds ``threshold`` in any token are "outliers": they are
multiplied in fp16 against the dequantized weight columns, and the rest goes through an int8 x
int8 -> int32 matmul with per-token and per-row scales. This is the decomposition bitsandbytes'
``Linear8bitLt(has_fp16_weights=False)`` performs.
"""

from __future__ import annotations

import functools

import torch

from ternlm.quant.int8 import absmax_quantize


def _int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K)^T int8 -> (M, N) int32."""
    try:
        return torch._int_mm(a, b_t.t())
    except (RuntimeError, NotImplementedError):  # shapes/devices _int_mm rejects
        return a.to(torch.int32) @ b_t.to(torch.int32).t()


def llm_int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, threshold: float = 6.0):
    """y = x @ W^T + b with the LLM.int8() mixed-precision decomposition.

    Returns ``(y, n_outlier_columns)``. x: (..., in); wq: (out, in) int8; w_scale: (out,).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    outliers = (x2.abs() > threshold).any(dim=0)  # (in,)
    n_out = int(outliers.sum())
    x_reg = x2.masked_fill(outliers, 0.0) if n_out else x2
    xq, x_scale = absmax_quantize(x_reg, 127.0, dim=1)  # per token: (M, in) int8, (M, 1)
    acc = _int8_matmul(xq, wq)
    y = acc.float() * x_scale * w_scale[None, :]
    if n_out:
        # fp16 path for outlier features, against the int8 weight columns dequantized to fp16
        w_cols = (wq[:, outliers].float() * w_scale[:, None]).half()
        y = y + (x2[:, outliers].half() @ w_cols.t()).float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], wq.shape[0]).to(x.dtype), n_out


@functools.lru_cache(maxsize=1)
def bitsandbytes_status() -> tuple[bool, str]:
    """(usable, reason). bitsandbytes is usable here when it imports and Linear8bitLt runs."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb  # noqa: F401

            m = bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False, threshold=6.0)
            m.load_state_dict(torch.nn.Linear(8, 4).state_dict())
            m(torch.randn(2, 8))
        return True, f"bitsandbytes {bnb.__version__}"
    except Exception as e:  # any failure means "use the PyTorch implementation"
        return False, f"bitsandbytes unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
