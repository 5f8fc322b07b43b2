import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.nn.ternary_linear import TernaryLinear
from ternlm.quant.ternary import ternarize

GRANULARITIES = ["per_tensor", "per_channel", "per_group"]
FMTS = ["2bit", "base3"]


def _cfg(granularity, act_bits=None, group_size=32):
    # groups of 32 over the tests' 100 / 300 inputs: the last group of each row is partial
    return TernaryConfig(granularity=granularity, group_size=group_size, act_bits=act_bits)


def _conv1d(in_f, out_f):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    c = Conv1D(out_f, in_f)
    nn.init.normal_(c.weight, std=0.05)
    nn.init.normal_(c.bias, std=0.05)
    return c


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_from_linear_a16_matches_dequantized_f_linear(fmt, granularity):
    torch.manual_seed(0)
    lin = nn.Linear(100, 37)
    m = TernaryLinear.from_linear(lin, _cfg(granularity), fmt)
    for x in (torch.randn(1, 100), torch.randn(3, 100), torch.randn(2, 9, 100)):  # decode, batch, (B, T, in)
        y = m(x)
        assert y.shape == (*x.shape[:-1], 37)
        torch.testing.assert_close(y, F.linear(x, m.dequantize_weight(), lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_from_conv1d_matches_linear_of_transposed_weight(fmt, granularity):
    conv = _conv1d(100, 37)
    m = TernaryLinear.from_linear(conv, _cfg(granularity), fmt)
    ref = TernaryLinear.from_weight(conv.weight.t(), conv.bias, _cfg(granularity), fmt)
    assert torch.equal(m.packed, ref.packed) and torch.equal(m.scale, ref.scale)
    x = torch.randn(2, 5, 100)
    torch.testing.assert_close(m(x), F.linear(x, m.dequantize_weight(), conv.bias), rtol=1e-5, atol=1e-5)
    # the dequantized weight is the canonical ternarization of Conv1D's (in, out) weight, transposed
    torch.testing.assert_close(m.dequantize_weight(), ternarize(conv.weight.t(), _cfg(granularity)).dequantize())


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a8_auto_equals_reference_bitwise(fmt, granularity):
    torch.manual_seed(0)
    m = TernaryLinear.from_linear(nn.Linear(300, 45), _cfg(granularity, act_bits=8), fmt)
    for x in (torch.randn(1, 300), torch.randn(4, 7, 300)):
        y = m(x)
        m.kernel = "reference"
        y_ref = m(x)
        m.kernel = "auto"
        assert torch.equal(y, y_ref)


def test_a8_close_to_float_layer():
    torch.manual_seed(0)
    m = TernaryLinear.from_linear(nn.Linear(256, 64), _cfg("per_channel", act_bits=8))
    x = torch.randn(8, 256)
    y_float = F.linear(x, m.dequantize_weight(), m.bias)
    assert (m(x) - y_float).abs().max() < 0.02 * y_float.abs().max()


def test_from_weight_uses_canonical_quantizer():
    w = torch.randn(24, 130)
    cfg = TernaryConfig(granularity="per_channel", scale_mode="fit")
    m = TernaryLinear.from_weight(w, None, cfg)
    t = ternarize(w, cfg)
    assert torch.equal(m.ternary().codes, t.codes) and torch.equal(m.scale, t.scale)
    assert m.bias is None and m.act_bits is None


def test_dtype_is_preserved():
    m = TernaryLinear.from_linear(nn.Linear(64, 16), _cfg("per_tensor", act_bits=8))
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt,max_bits", [("2bit", 2.0), ("base3", 1.7)])
def test_storage_is_about_two_bits_per_weight(fmt, max_bits):
    m = TernaryLinear.from_linear(nn.Linear(768, 768), _cfg("per_channel", act_bits=8), fmt)
    n_bytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    n_weights = 768 * 768
    assert m.packed.dtype == torch.uint8
    assert m.packed.numel() * 8 / n_weights <= max_bits + 0.07  # the codes themselves
    # plus 768 fp32 scales and 768 fp32 biases: ~4% on top
    assert n_bytes * 8 / n_weights <= max_bits * 1.05
    assert n_bytes <= n_weights * 1 / 4 * 1.05   # ~4x smaller than an int8 weight
    assert n_bytes <= n_weights * 4 / 16 * 1.05  # ~16x smaller than an fp32 weight


def test_state_dict_round_trip():
    src = TernaryLinear.from_linear(nn.Linear(100, 30), _cfg("per_group", act_bits=8), "base3")
    dst = TernaryLinear(100, 30, bias=True, act_bits=8, fmt="base3", granularity="per_group", group_size=32)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 100)
    assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("act_bits", [8, None])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_per_group_runs_the_compiled_kernels(fmt, act_bits, group_size):
    from ternlm.kernels import is_available

    torch.manual_seed(0)
    m = TernaryLinear.from_linear(nn.Linear(576, 40), _cfg("per_group", act_bits, group_size), fmt)
    assert m.scale.shape == (40, -(-576 // group_size))  # 576 = 2*256 + 64: a partial last group of 256
    bound = m.bind()
    assert bound.backend == ("native" if is_available() else "reference") and bound.group_size == group_size
    assert m.bind() is bound  # bound once, reused
    x = torch.randn(3, 576)
    y = m(x)
    m.kernel = "reference"
    assert m.bind().backend == "reference"
    if act_bits == 8:
        assert torch.equal(y, m(x))
    else:
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


def test_binding_follows_replaced_buffers():
    m = TernaryLinear.from_linear(nn.Linear(64, 16, bias=False), _cfg("per_channel", act_bits=8))
    x = torch.randn(2, 64)
    y = m(x)
    m.scale = m.scale * 2  # a new tensor: the next call re-binds
    torch.testing.assert_close(m(x), 2 * y)
    with torch.no_grad():
        m.scale.mul_(0.5)  # in place: the binding holds the same float32 buffer
    torch.testing.assert_close(m(x), y)
    import copy

    m2 = copy.deepcopy(m)  # a binding is never copied (it holds raw pointers)
    assert torch.equal(m2(x), m(x)) and m2.bind() is not m.bind()


def test_bad_arguments():
    with pytest.raises(TernlmError, match="multiple of 32"):
        TernaryLinear(100, 10, granularity="per_group", group_size=20)
    with pytest.raises(TernlmError):
        TernaryLinear(10, 10, fmt="3bit")
    with pytest.raises(TernlmError):
        TernaryLinear(10, 10, kernel="fast")
    with pytest.raises(TypeError):
        TernaryLinear.from_linear(nn.Conv2d(1, 1, 1))


def _compiled_matches_eager(act_bits, backend):
    torch.manual_seed(0)
    m = TernaryLinear.from_linear(nn.Linear(96, 40), _cfg("per_channel", act_bits=act_bits))
    x = torch.randn(2, 3, 96)
    expected = m(x)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    with torch.inference_mode():
        y = compiled(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("act_bits", [8, None])
def test_torch_compile_traces_custom_op(act_bits):
    # aot_eager runs dynamo + the ops' fake implementations without inductor's C++ codegen
    _compiled_matches_eager(act_bits, "aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    _compiled_matches_eager(8, "inductor")  # ~35 s on 2 cores, mostly inductor's first compile
