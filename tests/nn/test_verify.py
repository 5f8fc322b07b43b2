"""verify/check_layer on per-group scales, partial last groups included."""

import pytest
import torch
import torch.nn as nn

from ternlm.config import TernaryConfig
from ternlm.nn.bitlinear import BitLinear
from ternlm.nn.ternary_linear import TernaryLinear
from ternlm.nn.verify import check_layer


@pytest.mark.parametrize("in_f,g", [(256, 64), (300, 64), (100, 32)])
def test_per_group_layers_are_ternary(in_f, g):
    torch.manual_seed(0)
    cfg = TernaryConfig(granularity="per_group", group_size=g, act_bits=8)
    lin = nn.Linear(in_f, 12)
    bl = BitLinear(in_f, 12, config=cfg)
    bl.weight.data.copy_(lin.weight.data)
    groups = 12 * -(-in_f // g)
    for m in (bl, TernaryLinear.from_linear(lin, cfg)):
        r = check_layer("x", m)
        assert r.ok and r.ternary_share == 1.0 and r.n_scales == groups, (type(m).__name__, r)


def test_float_layer_and_wrong_groups_are_caught():
    torch.manual_seed(0)
    assert not check_layer("x", nn.Linear(100, 12)).ok
    # per-group codes checked as if per channel: different group scales in a row are not +-s
    m = TernaryLinear.from_linear(nn.Linear(300, 12), TernaryConfig(granularity="per_group", group_size=64))
    m.granularity = "per_channel"
    assert not check_layer("x", m).ok
