"""Triton 2-bit kernels against the PyTorch reference, on CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set before triton is imported, so the kernels run as Python/numpy on CPU
tensors: the same kernel source (unpacking, tiling, masking, epilogue) as on a GPU, without one.
W2A8 must equal the reference bit for bit (exact int32 accumulators, same float epilogue); W2A16
is allclose (different summation order). Shapes stay small because the interpreter is slow.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import, ours or the module's

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ternlm.errors import TernlmError  # noqa: E402
from ternlm.kernels import reference  # noqa: E402
from ternlm.kernels import triton_kernels as tk  # noqa: E402
from ternlm.quant.pack import pack  # noqa: E402

# (M tokens, N rows, K inputs): M in {1, 3, 17} (17 spans two M tiles of 16), N off the 32/64
# tile widths, K below, at and off the 256-weight block
SHAPES = [(1, 1, 1), (1, 7, 100), (3, 70, 300), (3, 33, 256), (17, 9, 513), (17, 40, 64)]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_on():
    os.environ["TRITON_INTERPRET"] = "1"  # undo anything another module changed since import
    yield


def _problem(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + N * 10 + K)
    codes = torch.randint(-1, 2, (N, K), generator=g).to(torch.int8)
    x = torch.randn(M, K, generator=g) * 3
    x[0, 0] = 40.0  # an outlier so rounding is exercised at several magnitudes
    return codes, pack(codes, "2bit"), x


def _scale(granularity, N, K):
    return {"per_tensor": torch.tensor(0.0371), "per_channel": torch.rand(N) + 0.05,
            "per_group": torch.rand(N, K // 64) + 0.05}[granularity]


def test_interpreter_is_active():
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    assert triton.knobs.runtime.interpret and tk.triton_available() and tk.interpreting()
    assert all(isinstance(k, InterpretedFunction) for k in tk._kernels(True))
    # and the kernels really run on CPU tensors
    _, packed, x = _problem(1, 3, 10)
    assert tk.linear_a8_triton(x, packed, torch.tensor(1.0), 10).device.type == "cpu"


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_a8_bitwise_equal(M, N, K, granularity):
    codes, packed, x = _problem(M, N, K)
    scale = _scale(granularity, N, K)
    assert torch.equal(tk.linear_a8_triton(x, packed, scale, K), reference.linear_a8(x, packed, scale, K))


def test_a8_integer_accumulators_exact():
    # tokens whose absmax is 127 quantize to themselves with scale 1.0: the output IS the int32 sum
    codes, packed, _ = _problem(3, 37, 600)
    q = torch.randint(-127, 128, (3, 600), dtype=torch.int8)
    q[:, 5] = 127
    y = tk.linear_a8_triton(q.float(), packed, torch.tensor(1.0), 600)
    acc = reference.a8_accumulators(q, codes)
    assert torch.equal(y, acc.float()) and torch.equal(y.to(torch.int32), acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_a16_close(M, N, K, granularity, dtype):
    codes, packed, x = _problem(M, N, K)
    x = x.to(dtype)
    scale = _scale(granularity, N, K)
    torch.testing.assert_close(tk.linear_a16_triton(x, packed, scale, K),
                               reference.linear_a16(x, packed, scale, K), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [1, 17])
def test_bias(M):
    codes, packed, x = _problem(M, 13, 300)
    scale, bias = torch.rand(13), torch.randn(13)
    assert torch.equal(tk.linear_a8_triton(x, packed, scale, 300, bias=bias),
                       reference.linear_a8(x, packed, scale, 300, bias=bias))
    torch.testing.assert_close(tk.linear_a16_triton(x, packed, scale, 300, bias=bias),
                               reference.linear_a16(x, packed, scale, 300, bias=bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,N,K,g", [(3, 70, 512, 128), (1, 9, 320, 64), (17, 6, 768, 256),
                                     (3, 9, 300, 128), (1, 5, 576, 256), (17, 6, 600, 512), (2, 7, 500, 192)])
def test_per_group_bitwise_equal(M, N, K, g):
    # a group ends mid-block, at a slice edge, at a block edge; partial last groups (300, 576, 600, 500)
    codes, packed, x = _problem(M, N, K)
    scale = torch.rand(N, -(-K // g)) + 0.05
    assert torch.equal(tk.linear_a8_triton(x, packed, scale, K, group_size=g),
                       reference.linear_a8(x, packed, scale, K, group_size=g))
    torch.testing.assert_close(tk.linear_a16_triton(x, packed, scale, K, group_size=g),
                               reference.linear_a16(x, packed, scale, K, group_size=g), rtol=1e-5, atol=1e-4)


def test_strided_activations_and_empty_batch():
    codes, packed, x = _problem(3, 5, 300)
    xt = x.t().contiguous().t()  # column-major view: the A16 kernel takes x's strides
    scale = torch.rand(5)
    torch.testing.assert_close(tk.linear_a16_triton(xt, packed, scale, 300),
                               reference.linear_a16(x, packed, scale, 300), rtol=1e-5, atol=1e-4)
    assert torch.equal(tk.linear_a8_triton(xt, packed, scale, 300), reference.linear_a8(x, packed, scale, 300))
    for fn in (tk.linear_a8_triton, tk.linear_a16_triton):
        assert fn(x[:0], packed, scale, 300).shape == (0, 5)


@pytest.mark.parametrize("fn", [tk.linear_a8_triton, tk.linear_a16_triton])
def test_bad_input_raises(fn, monkeypatch):
    _, packed, x = _problem(2, 4, 300)
    one = torch.tensor(1.0)
    with pytest.raises(TernlmError, match="activations"):
        fn(x[:, :299], packed, one, 300)
    with pytest.raises(TernlmError, match="packed"):
        fn(x, packed[:, :-1], one, 300)
    with pytest.raises(TernlmError, match="packed"):
        fn(x, packed.to(torch.int8), one, 300)
    with pytest.raises(TernlmError, match="scale"):
        fn(x, packed, torch.rand(5), 300)
    with pytest.raises(TernlmError, match="bias"):
        fn(x, packed, one, 300, bias=torch.randn(3))
    with pytest.raises(TernlmError, match="multiple of 64"):  # groups of 100
        fn(x, packed, torch.rand(4, 3), 300)
    with pytest.raises(TernlmError, match="group_size"):  # 300 / 7 does not divide: the size must be given
        fn(x, packed, torch.rand(4, 7), 300)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TernlmError, match="CUDA"):
        fn(x, packed, one, 300)


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from ternlm.errors import TernlmError\n"
            "from ternlm.kernels import triton_kernels as tk\n"
            "assert not tk.triton_available()\n"
            "try:\n"
            "    tk.linear_a8_triton(torch.ones(1, 4), torch.zeros(1, 16, dtype=torch.uint8), torch.tensor(1.), 4)\n"
            "except TernlmError as e:\n"
            "    assert 'Triton' in str(e) or 'CUDA' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error without triton')\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


_GPU_CHECK = """
import torch
from ternlm.kernels import reference, triton_kernels as tk
from ternlm.quant.pack import pack
for M, N, K in [(1, 300, 1000), (17, 70, 513), (200, 257, 768)]:
    codes = torch.randint(-1, 2, (N, K), dtype=torch.int8)
    x, packed, scale, bias = torch.randn(M, K) * 3, pack(codes, "2bit"), torch.rand(N) + .05, torch.randn(N)
    ref8 = reference.linear_a8(x, packed, scale, K, bias=bias)
    ref16 = reference.linear_a16(x, packed, scale, K, bias=bias)
    c = lambda t: t.cuda()
    got = tk.linear_a8_triton(c(x), c(packed), c(scale), K, c(bias)).cpu()
    assert torch.equal(got, ref8), ("a8", M, N, K, (got - ref8).abs().max().item())
    torch.testing.assert_close(tk.linear_a16_triton(c(x), c(packed), c(scale), K, c(bias)).cpu(), ref16,
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tk.linear_a16_triton(c(x).bfloat16(), c(packed), c(scale), K, c(bias)).cpu(),
                               reference.linear_a16(x.bfloat16(), packed, scale, K, bias=bias), rtol=1e-5, atol=1e-4)
    for g in (64, 128, 256):  # per-group scales, partial last groups
        gs = torch.rand(N, -(-K // g)) + .05
        got = tk.linear_a8_triton(c(x), c(packed), c(gs), K, c(bias), group_size=g).cpu()
        ref = reference.linear_a8(x, packed, gs, K, bias=bias, group_size=g)
        assert torch.equal(got, ref), ("a8 group", g, M, N, K, (got - ref).abs().max().item())
    # the package's dispatch sends CUDA tensors to Triton
    from ternlm.kernels import bind_linear
    f = bind_linear(c(packed), c(scale), K, bias=c(bias))
    assert f.backend == "triton", f.backend
    got = f(c(x)).cpu()
    assert torch.equal(got, ref8), ("binding", M, N, K, (got - ref8).abs().max().item())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_on_gpu():  # pragma: no cover - runs only where a GPU is present
    # a fresh process without the interpreter, so the kernels really compile for the GPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _GPU_CHECK], check=True, env=env)


@pytest.mark.parametrize("act_bits,group_size", [(8, None), (8, 128), (4, 64), (None, 128)])
def test_binding_runs_triton_backend(act_bits, group_size):
    # the package's entry point reaching the Triton kernels (CPU tensors through the interpreter)
    from ternlm.kernels import bind_linear

    codes, packed, x = _problem(3, 9, 300)
    scale = torch.rand(9, -(-300 // group_size)) + 0.05 if group_size else torch.rand(9) + 0.05
    f = bind_linear(packed, scale, 300, act_bits=act_bits, group_size=group_size, backend="triton")
    assert f.backend == "triton"
    if act_bits is None:
        torch.testing.assert_close(f(x), reference.linear_a16(x, packed, scale, 300, group_size=group_size),
                                   rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(f(x), reference.linear_a8(x, packed, scale, 300, act_bits=act_bits, group_size=group_size))


# ---- one token: the GEMV kernel (activation quantization inside the kernel) ----------------------

@pytest.mark.parametrize("cfg", [(32, 4, 4, 3), (4, 1, 2, 2), (16, 2, 4, 1)])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 100), (17, 255), (33, 256), (9, 513), (5, 1100)])
def test_gemv_a8_bitwise_equal(N, K, cfg, monkeypatch):
    monkeypatch.setattr(tk, "_GEMV_OVERRIDE", list(cfg))
    codes, packed, x = _problem(1, N, K)
    bias = torch.randn(N)
    scales = [(torch.tensor(0.0371), None), (torch.rand(N) + 0.05, None)]
    scales += [(torch.rand(N, -(-K // g)) + 0.05, g) for g in (64, 192) if K > g]
    for scale, g in scales:
        for bits in (8, 4):
            got = tk.linear_a8_triton(x, packed, scale, K, bias, group_size=g, act_bits=bits)
            assert torch.equal(got, reference.linear_a8(x, packed, scale, K, "2bit", bits, bias, group_size=g))
        for dt in (torch.float32, torch.float16):
            torch.testing.assert_close(tk.linear_a16_triton(x.to(dt), packed, scale, K, bias, group_size=g),
                                       reference.linear_a16(x.to(dt), packed, scale, K, "2bit", bias, group_size=g),
                                       rtol=1e-5, atol=1e-4)


def test_gemv_rounds_half_to_even_like_torch():
    # absmax 127: the token's scale is exactly 1, so x / scale lands on the halves themselves
    x = torch.zeros(1, 64)
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    packed = pack(torch.eye(64)[:8].to(torch.int8), "2bit")
    got = tk.linear_a8_triton(x, packed, torch.tensor(1.0), 64)
    assert got.tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0]]
    assert torch.equal(got, reference.linear_a8(x, packed, torch.tensor(1.0), 64))


def test_gemv_only_where_float_sums_stay_exact():
    assert tk.gemv_fits(132_000, 8) and not tk.gemv_fits(132_200, 8) and tk.gemv_fits(10**6, None)
    assert tk.gemv_config(4096, grouped=True)[1] == 1  # group folding walks one block a step


@pytest.mark.parametrize("cfg", [(4, 1, 2), (16, 2, 4), (32, 4, 4)])
@pytest.mark.parametrize("N,K", [(7, 256), (70, 1024), (33, 1536)])
def test_splitk_a8_bitwise_equal_and_scratch_left_zero(N, K, cfg, monkeypatch):
    # rows of whole 256-blocks, per tensor / per row: several programs per row block add partial sums
    monkeypatch.setattr(tk, "_SPLITK_OVERRIDE", list(cfg))
    codes, packed, x = _problem(1, N, K)
    for scale in (torch.tensor(0.0371), torch.rand(N) + 0.05):
        for bias in (None, torch.randn(N)):
            for bits in (8, 4):
                for _ in range(2):  # the second call relies on the first leaving the scratch zeroed
                    got = tk.linear_a8_triton(x, packed, scale, K, bias, act_bits=bits)
                    assert torch.equal(got, reference.linear_a8(x, packed, scale, K, "2bit", bits, bias))
    part, cnt = tk._scratch(torch.device("cpu"), N)
    assert not part.any() and not cnt.any()
    # the unsplit kernel gives the same bits
    monkeypatch.setattr(tk, "_SPLITK_ENABLED", False)
    got = tk.linear_a8_triton(x, packed, scale, K, bias)
    assert torch.equal(got, reference.linear_a8(x, packed, scale, K, bias=bias))
