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


# ---- learned scales (BitLinear.from_ternary): the distillation student ------------------------

import pytest  # noqa: E402

from ternlm.errors import TernlmError  # noqa: E402
from ternlm.nn.ternary_linear import TernaryLinear  # noqa: E402
from ternlm.quant.ternary import TernaryTensor, dequantize_ternary, ternarize  # noqa: E402

LEARNED_CFGS = [TernaryConfig(), TernaryConfig(granularity="per_channel"),
                TernaryConfig(granularity="per_group", group_size=32),  # 80 = 32 + 32 + 16: partial last group
                TernaryConfig(granularity="per_group", group_size=96)]  # one partial group per row


def _packed(cfg, act_bits=None):
    torch.manual_seed(1)
    w, b = torch.randn(24, 80), torch.randn(24)
    return TernaryLinear.from_weight(w, b, TernaryConfig(**{**cfg.__dict__, "act_bits": act_bits}),
                                     kernel="reference")


@pytest.mark.parametrize("cfg", LEARNED_CFGS, ids=lambda c: f"{c.granularity}{c.group_size}")
def test_from_ternary_starts_exactly_at_the_packed_layer(cfg):
    t = _packed(cfg)
    b = BitLinear.from_ternary(t.ternary(), t.bias, TernaryConfig(act_bits=None))
    assert b.learned_scale and b.scale.requires_grad
    assert torch.equal(b.scale.detach(), t.scale)  # the calibrated scales, untouched
    back = b.ternary()
    assert torch.equal(back.codes, t.ternary().codes) and torch.equal(back.scale, t.scale)
    assert torch.equal(b.effective_weight().detach(), t.dequantize_weight())
    x = torch.randn(5, 80)
    assert torch.allclose(b(x), t(x), atol=1e-5)
    # the scale is the learned one, not a recomputed absmean (which differs: codes * s has a
    # different mean magnitude than the weights the scale was fitted on)
    assert not torch.equal(ternarize(b.weight.detach(), b.config).scale, b.scale.detach())


def test_learned_scale_gradients():
    t = _packed(TernaryConfig(granularity="per_group", group_size=32))
    b = BitLinear.from_ternary(t.ternary(), t.bias)
    x, g = torch.randn(4, 80), torch.randn(4, 24)
    b(x).backward(g)
    gw = g.t() @ x  # dL/dW_eff, (out, in)
    assert torch.allclose(b.weight.grad, gw, atol=1e-5)  # STE: identity to the latent weights
    codes = t.ternary().codes.float()
    per_weight = gw * codes  # d(codes * s)/ds = codes, summed over each scale's group
    expect = torch.stack([per_weight[:, 0:32].sum(1), per_weight[:, 32:64].sum(1), per_weight[:, 64:80].sum(1)], 1)
    assert torch.allclose(b.scale.grad, expect, atol=1e-4)


@pytest.mark.parametrize("cfg", LEARNED_CFGS, ids=lambda c: f"{c.granularity}{c.group_size}")
@pytest.mark.parametrize("shape", [(5, 80), (2, 3, 80)])
def test_learned_scale_training_path_saves_codes_and_matches_the_autograd_expression(cfg, shape):
    """The training forward (a custom autograd function that keeps int8 codes, not float weights,
    for the backward pass) gives bitwise the output and gradients of F.linear over effective_weight()."""
    from ternlm.quant.activations import fake_quantize_activations
    from ternlm.quant.ste import ste

    t = _packed(cfg)
    b = BitLinear.from_ternary(t.ternary(), t.bias, TernaryConfig(**{**cfg.__dict__, "act_bits": 8}))
    with torch.no_grad():
        b.weight.add_(0.01 * torch.randn_like(b.weight))  # latent weights off the grid
    x = torch.randn(*shape, requires_grad=True)
    y = b(x)
    assert "LearnedScaleLinear" in type(y.grad_fn).__name__
    ref = torch.nn.functional.linear(ste(x, fake_quantize_activations(x, 8)), b.effective_weight(), b.bias)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b.weight, b.scale, b.bias), g)
    want = torch.autograd.grad(ref, (x, b.weight, b.scale, b.bias), g)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_learned_scale_on_conv1d_layout_uses_the_training_path_too():
    t = _packed(TernaryConfig(granularity="per_channel"))
    conv = Conv1D(24, 80)
    b = BitLinear.from_module(conv, TernaryConfig(granularity="per_channel", act_bits=None))
    with torch.no_grad():
        b.weight.copy_(t.dequantize_weight().t())
    b.scale = nn.Parameter(t.scale.clone())
    x = torch.randn(3, 80, requires_grad=True)
    y = b(x)
    ref = torch.nn.functional.linear(x, b.effective_weight(), b.bias)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b.weight, b.scale), g)
    want = torch.autograd.grad(ref, (x, b.weight, b.scale), g)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the scale's row sums run over a transposed layout in the expression: same sums, other order
    assert torch.allclose(got[2], want[2], rtol=1e-6, atol=1e-5)


def test_learned_scale_moves_the_codes_threshold():
    t = _packed(TernaryConfig(granularity="per_channel"))
    b = BitLinear.from_ternary(t.ternary(), t.bias)
    with torch.no_grad():
        b.scale.mul_(3.0)  # |W| = s_old < 0.5 * 3 s_old: every code rounds to 0
    assert b.ternary().codes.abs().sum() == 0
    with torch.no_grad():
        b.scale.div_(3.0)
        b.weight.mul_(0.4)  # |W| = 0.4 s < s / 2: zero
    assert b.ternary().codes.abs().sum() == 0


def test_learned_scale_with_activation_quantization_matches_packed_reference():
    t = _packed(TernaryConfig(granularity="per_group", group_size=32), act_bits=8)
    b = BitLinear.from_ternary(t.ternary(), t.bias, TernaryConfig(act_bits=8))
    x = torch.randn(3, 80)
    assert torch.allclose(b(x), t(x), atol=1e-4, rtol=1e-4)


def test_default_bitlinear_state_is_unchanged():
    b, c = _pair()
    assert not b.learned_scale and b.scale is None
    assert set(b.state_dict()) == {"weight", "bias"} and set(c.state_dict()) == {"weight", "bias"}


def test_from_ternary_refuses_a_wrong_scale_shape():
    t = ternarize(torch.randn(6, 40), TernaryConfig(granularity="per_group", group_size=32))
    bad = TernaryTensor(t.codes, torch.ones(6, 1), "per_group", 32)
    with pytest.raises(TernlmError, match=r"expected \(6, 2\)"):
        BitLinear.from_ternary(bad)


def test_learned_scale_lambda_warmup_blends_and_projects():
    t = _packed(TernaryConfig(granularity="per_channel"))
    b = BitLinear.from_ternary(t.ternary(), t.bias, TernaryConfig(lambda_warmup_steps=4))
    with torch.no_grad():
        b.weight.add_(0.01 * torch.randn_like(b.weight))
    set_quant_lambda(b, 0.5)
    wq = dequantize_ternary(b.ternary())
    assert torch.allclose(b.effective_weight(), 0.5 * b.weight + 0.5 * wq, atol=1e-6)
    b.project_()
    assert torch.equal(b.weight.detach(), dequantize_ternary(b.ternary()))
