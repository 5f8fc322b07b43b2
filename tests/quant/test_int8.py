import pytest
import torch

from ternlm.config import Int8Config
from ternlm.quant.activations import fake_quantize_activations, quantize_activations
from ternlm.quant.int8 import quantize_int8


@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
def test_int8_round_trip_within_half_step(scheme, gran):
    torch.manual_seed(0)
    w = torch.randn(16, 33) * 2 + (1.5 if scheme == "zeropoint" else 0)
    t = quantize_int8(w, Int8Config(scheme=scheme, granularity=gran))
    assert t.q.dtype == torch.int8
    step = t.scale if t.scale.dim() == 0 else t.scale[:, None]
    err = (t.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    assert tuple(t.scale.shape) == (() if gran == "per_tensor" else (16,))


def test_absmax_uses_symmetric_range_and_zero_point_full_range():
    w = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    a = quantize_int8(w, Int8Config("absmax", "per_tensor"))
    assert a.q.max() == 127 and a.zero_point is None
    z = quantize_int8(w, Int8Config("zeropoint", "per_tensor"))
    assert z.q.min() == -128 and z.q.max() == 127
    assert z.dequantize()[0, 0] == 0.0  # zero is exactly representable


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_activation_quant_per_token(bits, qmax):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    x[0, 0] *= 100  # one loud token must not change the others' scales
    q, s = quantize_activations(x, bits)
    assert q.dtype == torch.int8 and s.shape == (2, 5, 1)
    assert q.abs().max() <= qmax
    assert torch.equal(q.abs().amax(-1), torch.full((2, 5), qmax, dtype=torch.int8))
    err = (fake_quantize_activations(x, bits) - x).abs()
    assert (err <= s / 2 + 1e-5).all()
