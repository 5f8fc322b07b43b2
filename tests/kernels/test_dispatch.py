"""The one dispatch decision (``select_backend``) and the one binding (``bind_linear``), on CPU.

The decision is a pure function of device type, extension / Triton availability, format and
group size, so every branch is checked here without a GPU; the Triton branch itself runs on CPU
through Triton's interpreter in test_triton.py and on a real GPU in its GPU test.
"""

import warnings

import pytest
import torch

from ternlm.errors import TernlmError
from ternlm.kernels import _ext, bind_linear, ops, reference, select_backend
from ternlm.quant.pack import pack


@pytest.mark.parametrize("device,ext,triton,fmt,group,want", [
    ("cuda", True, True, "2bit", None, "triton"),
    ("cuda", False, True, "2bit", 128, "triton"),
    ("cuda", True, True, "2bit", 32, "reference"),  # Triton groups are whole 64-weight slices
    ("cuda", True, True, "base3", None, "reference"),  # no Triton base-3 kernel
    ("cuda", True, False, "2bit", None, "reference"),  # no Triton installed
    ("cpu", True, True, "2bit", None, "native"),
    ("cpu", True, False, "base3", 256, "native"),
    ("cpu", True, False, "2bit", 32, "native"),
    ("cpu", True, False, "2bit", 48, "reference"),  # a group size the compiled kernels lack
    ("cpu", True, False, "2bit", 16, "reference"),
    ("cpu", False, True, "2bit", None, "reference"),  # no extension
    ("mps", True, True, "2bit", None, "reference"),  # any other device
    ("meta", True, True, "2bit", None, "reference"),
])
def test_select_backend(device, ext, triton, fmt, group, want):
    assert select_backend(device, ext, triton, fmt, group) == want


def _weight(N=6, K=300, fmt="2bit", seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, K), generator=g).to(torch.int8)
    return pack(codes, fmt), torch.randn(3, K, generator=g)


@pytest.mark.parametrize("scale_kind", ["per_tensor", "per_channel", "per_group"])
def test_binding_picks_the_extension_on_cpu_and_the_reference_without_it(scale_kind):
    packed, x = _weight()
    scale = {"per_tensor": torch.tensor(0.3), "per_channel": torch.rand(6) + .1,
             "per_group": torch.rand(6, 3) + .1}[scale_kind]
    g = 128 if scale_kind == "per_group" else None
    want = reference.linear_a8(x, packed, scale, 300, group_size=g)
    f = bind_linear(packed, scale, 300, group_size=g)
    assert f.backend == ("native" if _ext.is_available() else "reference")
    assert torch.equal(f(x), want)
    try:
        _ext.disable_extension(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f_ref = bind_linear(packed, scale, 300, group_size=g)
        assert f_ref.backend == "reference" and torch.equal(f_ref(x), want)
        with pytest.raises(TernlmError, match="not available"):
            bind_linear(packed, scale, 300, group_size=g, backend="native")
    finally:
        _ext.disable_extension(False)


def test_binding_validates_once_and_owns_its_tensors():
    packed, x = _weight()
    scale = torch.rand(6, dtype=torch.float64) + .1  # converted once to float32, kept by the binding
    f = bind_linear(packed, scale, 300, bias=torch.randn(6).half())
    assert f.scale.dtype == torch.float32 and f.bias.dtype == torch.float32
    y = f(x)
    del scale
    assert torch.equal(f(x), y)
    out = torch.empty(3, 6)
    assert f(x, out) is out and torch.equal(out, y)
    with pytest.raises(TernlmError, match="packed uint8"):
        bind_linear(packed.to(torch.int8), torch.tensor(1.0), 300)
    with pytest.raises(TernlmError, match="packed uint8"):
        bind_linear(packed, torch.tensor(1.0), 299 + 257)
    with pytest.raises(TernlmError, match="scale"):
        bind_linear(packed, torch.rand(5), 300)
    with pytest.raises(TernlmError, match="scale"):
        bind_linear(packed, torch.ones(6, dtype=torch.int32), 300)
    with pytest.raises(TernlmError, match="bias"):
        bind_linear(packed, torch.tensor(1.0), 300, bias=torch.randn(5))
    with pytest.raises(TernlmError, match="act_bits"):
        bind_linear(packed, torch.tensor(1.0), 300, act_bits=6)
    with pytest.raises(TernlmError, match="format"):
        bind_linear(packed, torch.tensor(1.0), 300, fmt="3bit")
    with pytest.raises(TernlmError, match="backend"):
        bind_linear(packed, torch.tensor(1.0), 300, backend="fast")


@pytest.mark.parametrize("act_bits", [8, None])
def test_bad_calls_raise_before_reaching_c(act_bits):
    packed, x = _weight()
    f = bind_linear(packed, torch.rand(6), 300, act_bits=act_bits)

    class Trap:  # stands in for the extension: any call into "C" fails the test
        def __getattr__(self, name):
            raise AssertionError(f"reached the extension ({name})")

    f._mod = Trap()
    for bad in (x[:, :299], x[0], x.to("meta")):
        with pytest.raises(TernlmError):
            f(bad)
    for out in (torch.empty(3, 5), torch.empty(3, 6, dtype=torch.float64), torch.empty(6, 3).t()):
        with pytest.raises(TernlmError, match="out"):
            f(x, out)


def test_functional_ops_go_through_the_binding(monkeypatch):
    packed, x = _weight()
    calls = []
    real = ops.BoundLinear.__call__
    monkeypatch.setattr(ops.BoundLinear, "__call__", lambda self, *a: calls.append(self.act_bits) or real(self, *a))
    ops.linear_a8(x, packed, torch.tensor(0.5), 300)
    ops.linear_a16(x, packed, torch.tensor(0.5), 300)
    assert calls == [8, None]
