import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ternlm.config import TernaryConfig
from ternlm.nn.bitlinear import BitLinear
from ternlm.nn.surgery import project_to_ternary_, set_quant_lambda
from ternlm.quant.ternary import fake_quantize_ternary


def _pair(cfg=None):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    conv = Conv1D(7, 12)  # nf=out, nx=in; weight (in, out)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    return BitLinear.from_module(lin, cfg), BitLinear.from_module(conv, cfg)


def test_forward_uses_ternary_weights():
    b, _ = _pair()
    x = torch.randn(3, 12)
    expect = x @ fake_quantize_ternary(b.weight).t() + b.bias
    assert torch.allclose(b(x), expect, atol=1e-6)


def test_conv1d_equals_linear_with_transposed_weights():
    for cfg in (TernaryConfig(), TernaryConfig(granularity="per_channel", act_bits=8),
                TernaryConfig(granularity="per_group", group_size=4, act_bits=4)):
        bl, bc = _pair(cfg)
        assert bc.transposed and bc.weight.shape == (12, 7)
        x = torch.randn(2, 5, 12)
        tl, tc = bl.ternary(), bc.ternary()
        assert torch.equal(tl.codes, tc.codes) and torch.equal(tl.scale, tc.scale)
        # same math; only the matmul's memory order differs
        assert torch.allclose(bl(x), bc(x), atol=1e-6)


def test_ste_gradient_is_identity():
    b, _ = _pair()
    x = torch.randn(4, 12)
    g = torch.randn(4, 7)
    b(x).backward(g)
    # dL/dW_latent == dL/dW_quant == g^T x, as if the quantizer were the identity
    assert torch.allclose(b.weight.grad, g.t() @ x, atol=1e-5)


def test_activation_ste_passes_gradient():
    b, _ = _pair(TernaryConfig(act_bits=8))
    x = torch.randn(4, 12, requires_grad=True)
    b(x).sum().backward()
    w = fake_quantize_ternary(b.weight)
    assert torch.allclose(x.grad, torch.ones(4, 7) @ w, atol=1e-5)


def test_lambda_warmup_blends():
    b, _ = _pair(TernaryConfig(lambda_warmup_steps=10))
    assert b.quant_lambda == 0.0
    x = torch.randn(2, 12)
    lin_out = x @ b.weight.t() + b.bias
    assert torch.allclose(b(x), lin_out, atol=1e-6)
    set_quant_lambda(b, 1.0)
    assert torch.allclose(b(x), x @ fake_quantize_ternary(b.weight).t() + b.bias, atol=1e-6)


def test_projection_makes_latent_ternary():
    b, c = _pair()
    project_to_ternary_(nn.ModuleList([b, c]))
    for m in (b, c):
        vals = m.weight.abs().unique()
        assert len(vals) <= 2
