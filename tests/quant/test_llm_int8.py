import pytest
import torch

from ternlm.config import LLMInt8Config
from ternlm.nn.int8_linear import LLMInt8Linear
from ternlm.config import Int8Config
from ternlm.quant.int8 import quantize_int8
from ternlm.quant.llm_int8 import bitsandbytes_status, llm_int8_linear


def test_outlier_columns_go_through_fp16():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.1
    x = torch.randn(8, 64)
    x[:, 5] = 40.0  # one outlier feature
    t = quantize_int8(w, Int8Config("absmax", "per_channel"))
    q, s = t.q, t.scale
    y, n = llm_int8_linear(x, q, s, None, threshold=6.0)
    assert n == 1
    ref = x @ w.t()
    # with the outlier routed to fp16 the error stays at int8 level despite the 40x feature
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    # without decomposition (huge threshold) the outlier blows up the per-token int8 scale
    y_naive, n0 = llm_int8_linear(x, q, s, None, threshold=1e9)
    assert n0 == 0
    assert (y - ref).abs().mean() < (y_naive - ref).abs().mean()


def test_torch_backend_module():
    lin = torch.nn.Linear(16, 8)
    m = LLMInt8Linear.from_module(lin, LLMInt8Config(backend="torch"))
    assert m.backend == "torch" and m.qweight.dtype == torch.int8
    x = torch.randn(3, 16)
    assert torch.allclose(m(x), lin(x), atol=0.05)


@pytest.mark.skipif(not bitsandbytes_status()[0], reason="bitsandbytes not usable on this platform")
def test_bitsandbytes_and_torch_backends_agree():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    x[:, 3] *= 20
    a = LLMInt8Linear.from_module(lin, LLMInt8Config(backend="torch"))(x)
    b_mod = LLMInt8Linear.from_module(lin, LLMInt8Config(backend="bitsandbytes"))
    assert b_mod.backend == "bitsandbytes"
    b = b_mod(x)
    ref = lin(x)
    tol = 0.02 * ref.abs().max()
    assert (a - ref).abs().max() < tol and (b - ref).abs().max() < tol
