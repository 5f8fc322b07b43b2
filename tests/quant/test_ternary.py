import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.quant.ternary import absmean_scale, dequantize_ternary, expand_scale, ternarize

GRANS = [("per_tensor", 128), ("per_channel", 128), ("per_group", 4)]


@pytest.mark.parametrize("gran,g", GRANS)
@given(out_f=st.integers(1, 9), groups=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_codes_are_ternary_and_shapes(gran, g, out_f, groups, seed):
    torch.manual_seed(seed)
    w = torch.randn(out_f, groups * 4) * 3
    t = ternarize(w, TernaryConfig(granularity=gran, group_size=g))
    assert t.codes.dtype == torch.int8 and t.codes.shape == w.shape
    assert set(t.codes.unique().tolist()) <= {-1, 0, 1}
    expected = {"per_tensor": (), "per_channel": (out_f,), "per_group": (out_f, groups)}[gran]
    assert tuple(t.scale.shape) == expected
    assert (t.scale > 0).all()


def test_absmean_matches_bitnet_formula():
    w = torch.tensor([[0.1, -0.5, 0.02, 1.0], [0.3, -0.3, 0.0, 0.05]])
    gamma = w.abs().mean()
    t = ternarize(w)
    assert torch.allclose(t.scale, gamma)
    assert torch.equal(t.codes, torch.round(w / gamma).clamp(-1, 1).to(torch.int8))
    assert torch.allclose(absmean_scale(w, TernaryConfig()), gamma)


@pytest.mark.parametrize("gran,g", GRANS)
def test_requantizing_ternary_tensor_keeps_codes(gran, g):
    torch.manual_seed(0)
    cfg = TernaryConfig(granularity=gran, group_size=g)
    t = ternarize(torch.randn(6, 16), cfg)
    t2 = ternarize(t.dequantize(), cfg)
    assert torch.equal(t2.codes, t.codes)


@pytest.mark.parametrize("gran,g", GRANS)
def test_fit_scale_is_exactly_idempotent(gran, g):
    torch.manual_seed(1)
    cfg = TernaryConfig(granularity=gran, group_size=g, scale_mode="fit")
    d = ternarize(torch.randn(6, 16), cfg).dequantize()
    assert torch.equal(ternarize(d, cfg).dequantize(), d)


def test_dense_ternary_tensor_is_unchanged_with_absmean():
    # all entries +-s: mean|W| == s, so absmean is a fixed point too
    w = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) * 0.37
    assert torch.equal(ternarize(w).dequantize(), w)


def test_fit_lowers_reconstruction_error():
    torch.manual_seed(2)
    w = torch.randn(64, 64)
    e_abs = (dequantize_ternary(ternarize(w)) - w).pow(2).mean()
    e_fit = (dequantize_ternary(ternarize(w, TernaryConfig(scale_mode="fit"))) - w).pow(2).mean()
    assert e_fit < e_abs


@pytest.mark.parametrize("scale_mode", ["absmean", "fit"])
def test_partial_last_group_is_quantized_on_its_own(scale_mode):
    # 10 inputs in groups of 4: two full groups and a partial one of 2 weights per row
    w = torch.randn(5, 10)
    cfg = TernaryConfig(granularity="per_group", group_size=4, scale_mode=scale_mode)
    t = ternarize(w, cfg)
    assert t.scale.shape == (5, 3) and t.codes.shape == (5, 10)
    head = ternarize(w[:, :8], cfg)
    tail = ternarize(w[:, 8:], TernaryConfig(granularity="per_channel", scale_mode=scale_mode))
    assert torch.equal(t.codes, torch.cat([head.codes, tail.codes], 1))
    assert torch.equal(t.scale, torch.cat([head.scale, tail.scale[:, None]], 1))
    gamma = absmean_scale(w, cfg)
    assert gamma.shape == (5, 3) and torch.equal(gamma[:, 2], w[:, 8:].abs().mean(1).clamp_min(cfg.eps))
    if scale_mode == "absmean":
        assert torch.equal(t.scale, gamma)
    deq = t.dequantize()
    assert torch.equal(deq[:, 8:], t.codes[:, 8:].float() * t.scale[:, 2:3])


def test_expand_scale_checks_the_group_count():
    with pytest.raises(TernlmError, match="per_group scale must have shape"):
        expand_scale(torch.ones(4, 2), torch.Size((4, 10)), "per_group", 4)
    assert torch.equal(expand_scale(torch.tensor([[1.0, 2.0, 3.0]]), torch.Size((1, 10)), "per_group", 4),
                       torch.tensor([[1.0] * 4 + [2.0] * 4 + [3.0] * 2]))


def test_bad_shapes_and_config():
    with pytest.raises(TernlmError):
        ternarize(torch.randn(4, 10), TernaryConfig(granularity="per_group", group_size=0))
    with pytest.raises(TernlmError):
        ternarize(torch.randn(4, 4, 4))
    with pytest.raises(TernlmError):
        TernaryConfig(granularity="per_row")
    with pytest.raises(TernlmError):
        TernaryConfig(act_bits=3)


def test_all_zero_weight_is_safe():
    t = ternarize(torch.zeros(3, 8))
    assert torch.isfinite(t.scale).all() and (t.codes == 0).all()
