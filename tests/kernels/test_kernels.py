"""Compiled kernels against their pure-PyTorch reference, at every dispatch level this CPU runs.

Integer path (W1.58A8): the int32 accumulators must be EXACTLY equal, and so must the float
outputs -- kernel and reference do the same float32 operations in the same order: (acc *
act_scale) * w_scale, or per group the fold documented in ternlm/kernels/reference.py. Float
path (W1.58A16): allclose (the kernel sums in a different order).
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from ternlm.errors import TernlmError
from ternlm.kernels import _ext, ops, reference
from ternlm.quant.activations import quantize_activations
from ternlm.quant.pack import pack

if not _ext.is_available():  # pragma: no cover - only on machines where the build failed
    if os.environ.get("TERNLM_REQUIRE_KERNELS") == "1":
        pytest.fail("compiled kernels missing and TERNLM_REQUIRE_KERNELS=1", pytrace=False)
    pytest.skip("compiled kernels not built (pip install -e . with a C++ compiler)", allow_module_level=True)

LEVELS = _ext.available_levels()
FMTS = ["2bit", "base3"]
# (M tokens, N rows, K inputs): batch 1 and > 1, widths off every block/SIMD multiple (2-bit rows
# with 1-3 tail planes after their full blocks: 100, 257, 300, 576, 777, ...), tile tails
SHAPES = [(1, 1, 1), (1, 7, 100), (1, 64, 768), (1, 12, 576), (2, 5, 257), (3, 33, 300), (4, 8, 320),
          (5, 13, 777), (8, 9, 64), (17, 6, 513), (70, 37, 160),
          # whole 16-row chunks from 8 tokens: the AMX tile GEMM (a partial 64-input chunk, padded token tiles)
          (8, 16, 576), (20, 32, 1000), (33, 48, 160)]


@pytest.fixture(params=LEVELS)
def level(request):
    with _ext.use_level(request.param):
        yield request.param


def _problem(M, N, K, fmt, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + N * 10 + K)
    codes = torch.randint(-1, 2, (N, K), generator=g).to(torch.int8)
    x = torch.randn(M, K, generator=g) * 3
    x[0, 0] = 40.0  # an outlier so rounding is exercised at several magnitudes
    return codes, pack(codes, fmt), x


def test_levels_cover_this_cpu():
    assert LEVELS[0] == "scalar"
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx2" in flags and "fma" in flags:
        assert "avx2" in LEVELS
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= set(flags):
        assert "avx512_vnni" in LEVELS
    if {"avx512_vnni", "amx_tile", "amx_int8"} <= set(flags):
        assert "amx" in LEVELS


@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("M,K", [(1, 1), (3, 100), (5, 777), (64, 768)])
def test_quantize_matches_canonical(level, M, K, act_bits):
    x = torch.randn(M, K) * 2
    q, s, sums = ops.quantize_activations(x, act_bits)
    q_ref, s_ref = quantize_activations(x, act_bits)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert torch.equal(sums, q_ref.int().sum(1, dtype=torch.int32))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_accumulators_exact(level, fmt, M, N, K):
    codes, packed, x = _problem(M, N, K, fmt)
    q, _ = quantize_activations(x, 8)
    assert torch.equal(ops.a8_accumulators(q, packed, K, fmt), reference.a8_accumulators(q, codes))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", [(1, 9, 2048), (1, 5, 960), (3, 6, 1000)])
def test_accumulators_exact_at_the_int8_extremes(level, fmt, M, N, K):
    # int8 -128 against code +1 everywhere: the largest partial sums any tile keeps in int16
    g = torch.Generator().manual_seed(M + N + K)
    codes = torch.randint(-1, 2, (N, K), generator=g).to(torch.int8)
    codes[0] = 1
    q = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    q[0] = -128
    expect = reference.a8_accumulators(q, codes)
    assert expect[0, 0] == -128 * K
    assert torch.equal(ops.a8_accumulators(q, pack(codes, fmt), K, fmt), expect)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_linear_a8_bitwise_equal(level, fmt, M, N, K, granularity):
    codes, packed, x = _problem(M, N, K, fmt)
    scale = torch.tensor(0.0371) if granularity == "per_tensor" else torch.rand(N) + 0.05
    out = ops.linear_a8(x, packed, scale, K, fmt, backend="native")
    assert torch.equal(out, reference.linear_a8(x, packed, scale, K, fmt))


@pytest.mark.parametrize("M", [1, 9])
def test_linear_bias_fused(level, M):
    codes, packed, x = _problem(M, 13, 300, "2bit")
    scale, bias = torch.rand(13), torch.randn(13)
    assert torch.equal(ops.linear_a8(x, packed, scale, 300, bias=bias, backend="native"),
                       reference.linear_a8(x, packed, scale, 300, bias=bias))
    torch.testing.assert_close(ops.linear_a16(x, packed, scale, 300, bias=bias, backend="native"),
                               reference.linear_a16(x, packed, scale, 300, bias=bias), rtol=1e-5, atol=1e-4)


def test_linear_a4_bitwise_equal(level):
    codes, packed, x = _problem(6, 11, 300, "2bit")
    scale = torch.rand(11)
    assert torch.equal(ops.linear_a8(x, packed, scale, 300, act_bits=4, backend="native"),
                       reference.linear_a8(x, packed, scale, 300, act_bits=4))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", SHAPES + [(20, 9, 300)])  # M >= 16 takes the dequantize + sgemm path
def test_linear_a16_close(level, fmt, M, N, K):
    codes, packed, x = _problem(M, N, K, fmt)
    scale = torch.rand(N) + 0.05
    out = ops.linear_a16(x, packed, scale, K, fmt, backend="native")
    torch.testing.assert_close(out, reference.linear_a16(x, packed, scale, K, fmt), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_bitwise_equal(level, fmt):
    codes, packed, _ = _problem(1, 21, 333, fmt)
    for scale in (torch.tensor(0.5), torch.rand(21)):
        assert torch.equal(ops.dequantize(packed, scale, 333, fmt, backend="native"),
                           reference.dequantize(packed, scale, 333, fmt))


def test_thread_count_does_not_change_results():
    codes, packed, x = _problem(9, 301, 1000, "2bit")
    scale = torch.rand(301)
    outs = []
    for n in (1, 2, 3, 70):  # 70: more threads than the pool's task ranges (64), so some share one
        _ext.set_num_threads(n)
        outs.append(ops.linear_a8(x, packed, scale, 1000))
    _ext.set_num_threads(None)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_pool_slots_are_reused_safely():
    # many more jobs than the pool's ring of job slots, back to back, each with its own inputs
    x, packed, scale, _ = _big_job()
    xs = [x * (i + 1) for i in range(40)]
    want = [reference.linear_a8(xi, packed, scale, 768) for xi in xs]
    _ext.set_num_threads(2)
    try:
        got = [ops.linear_a8(xi, packed, scale, 768) for xi in xs]
    finally:
        _ext.set_num_threads(None)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def _big_job():
    # enough work (M * N * K > 2**21) that the kernels hand tasks to pool threads
    codes, packed, x = _problem(3, 1500, 768, "2bit")
    scale = torch.rand(1500)
    return x, packed, scale, reference.linear_a8(x, packed, scale, 768)


def test_concurrent_callers_get_their_own_results():
    from concurrent.futures import ThreadPoolExecutor

    jobs = [_big_job() for _ in range(4)]
    _ext.set_num_threads(2)
    try:
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda j: [ops.linear_a8(j[0], j[1], j[2], 768) for _ in range(5)], jobs))
    finally:
        _ext.set_num_threads(None)
    for job, res in zip(jobs, outs):
        assert all(torch.equal(r, job[3]) for r in res)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_work_in_a_forked_child():
    x, packed, scale, expected = _big_job()
    _ext.set_num_threads(2)
    try:
        ops.linear_a8(x, packed, scale, 768)  # start the pool in the parent
        pid = os.fork()
        if pid == 0:  # child: the pool's threads did not survive the fork
            ok = torch.equal(ops.linear_a8(x, packed, scale, 768), expected)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        _ext.set_num_threads(None)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# (M, N, K): per-group shapes with K off every group size (a partial last group), GEMV (M < 8,
# the direct 2-bit paths for groups of 256 and of whole 64-weight planes) and GEMM (M >= 8) tiles, and GPT-2's 576-wide case
GROUP_SHAPES = [(1, 7, 100), (1, 64, 768), (1, 12, 576), (1, 16, 960), (2, 5, 257), (3, 33, 576), (5, 13, 777), (9, 9, 300),
                (17, 6, 513), (70, 37, 640),
                # groups of exactly 64 with whole 4-row tiles at several tokens: the multi-token decode tile
                # (full blocks and tail planes, a partial last group, 1-4 tokens per call)
                (2, 12, 576), (7, 8, 300), (16, 8, 960), (64, 12, 768),
                # and whole 16-row chunks from 8 tokens: the AMX tile GEMM (token tiles of 16, the last one padded)
                (8, 16, 576), (20, 32, 960), (33, 48, 300)]
GROUP_SIZES = [32, 64, 128, 192, 256]


def _group_scale(N, K, g, seed=0):
    gen = torch.Generator().manual_seed(seed + N + K + g)
    return torch.rand(N, -(-K // g), generator=gen) + 0.05  # (N, ceil(K / g)): every group its own scale


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", GROUP_SHAPES)
def test_linear_a8_per_group_bitwise_equal(level, fmt, M, N, K, g):
    codes, packed, x = _problem(M, N, K, fmt)
    scale = _group_scale(N, K, g)
    out = ops.linear_a8(x, packed, scale, K, fmt, backend="native", group_size=g)
    want = reference.linear_a8(x, packed, scale, K, fmt, group_size=g)
    assert torch.equal(out, want)
    # and the groups really are applied: one group's scale changed changes that group's share only
    if scale.shape[1] > 1:
        s2 = scale.clone()
        s2[:, -1] *= 2
        assert not torch.equal(ops.linear_a8(x, packed, s2, K, fmt, backend="native", group_size=g), out)


@pytest.mark.parametrize("g", [64, 256])
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("M", [1, 9])
def test_linear_per_group_bias_and_a4(level, g, act_bits, M):
    codes, packed, x = _problem(M, 13, 300, "2bit")
    scale, bias = _group_scale(13, 300, g), torch.randn(13)
    assert torch.equal(ops.linear_a8(x, packed, scale, 300, act_bits=act_bits, bias=bias, backend="native",
                                     group_size=g),
                       reference.linear_a8(x, packed, scale, 300, act_bits=act_bits, bias=bias, group_size=g))
    torch.testing.assert_close(ops.linear_a16(x, packed, scale, 300, bias=bias, backend="native", group_size=g),
                               reference.linear_a16(x, packed, scale, 300, bias=bias, group_size=g),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", GROUP_SHAPES[:6] + [(20, 9, 300)])  # M >= 16: dequantize + sgemm
def test_linear_a16_per_group_close(level, fmt, M, N, K, g):
    codes, packed, x = _problem(M, N, K, fmt)
    scale = _group_scale(N, K, g)
    out = ops.linear_a16(x, packed, scale, K, fmt, backend="native", group_size=g)
    torch.testing.assert_close(out, reference.linear_a16(x, packed, scale, K, fmt, group_size=g),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_per_group_bitwise_equal(level, fmt, g):
    codes, packed, _ = _problem(1, 21, 333, fmt)
    scale = _group_scale(21, 333, g)
    out = ops.dequantize(packed, scale, 333, fmt, backend="native", group_size=g)
    assert torch.equal(out, reference.dequantize(packed, scale, 333, fmt, group_size=g))
    assert torch.equal(out, codes.float() * scale.repeat_interleave(g, 1)[:, :333])


@pytest.mark.parametrize("g", [64, 256])
@pytest.mark.parametrize("M", [1, 9])
def test_per_group_thread_count_does_not_change_results(g, M):
    codes, packed, x = _problem(M, 301, 1000, "2bit")
    scale = _group_scale(301, 1000, g)
    want = reference.linear_a8(x, packed, scale, 1000, group_size=g)
    for n in (1, 2, 3):
        _ext.set_num_threads(n)
        try:
            assert torch.equal(ops.linear_a8(x, packed, scale, 1000, group_size=g), want)
        finally:
            _ext.set_num_threads(None)


def test_per_group_size_is_validated():
    codes, packed, x = _problem(3, 4, 300, "2bit")
    scale = torch.rand(4, 7)  # ceil(300 / 48) = 7
    with pytest.raises(TernlmError, match="multiple of 32"):
        ops.linear_a8(x, packed, scale, 300, backend="native", group_size=48)
    # auto: a group size the fast kernels lack runs the reference
    assert torch.equal(ops.linear_a8(x, packed, scale, 300, group_size=48),
                       reference.linear_a8(x, packed, scale, 300, group_size=48))
    with pytest.raises(TernlmError, match="groups"):  # 7 groups do not fit groups of 64 over 300 inputs
        ops.linear_a8(x, packed, scale, 300, group_size=64)
    with pytest.raises(TernlmError, match="group_size"):  # 300 / 7 does not divide: the size must be given
        ops.linear_a8(x, packed, scale, 300)


def test_shape_errors_are_clear():
    _, packed, x = _problem(2, 4, 300, "2bit")  # 80 bytes per 2-bit row, base-3 would take 64
    with pytest.raises(TernlmError):
        ops.linear_a8(x[:, :299], packed, torch.tensor(1.0), 300)
    with pytest.raises(TernlmError):
        ops.linear_a8(x, packed, torch.tensor(1.0), 300, fmt="base3")
    with pytest.raises(TernlmError):
        _ext.set_level("avx9000")


@pytest.mark.parametrize("fmt", FMTS)
def test_custom_ops_registered_and_consistent(fmt):
    codes, packed, x = _problem(3, 8, 200, fmt)
    scale = torch.rand(8)
    a8 = ops.CUSTOM_OPS[(fmt, 8)]
    a16 = ops.CUSTOM_OPS[(fmt, None)]
    bias = torch.randn(8)
    for b in (None, bias):
        torch.library.opcheck(a8, (x, packed, scale, b, 200, 8))
        torch.library.opcheck(a16, (x, packed, scale, b, 200))
    with torch.inference_mode():
        assert torch.equal(a8(x, packed, scale, bias, 200, 8),
                           reference.linear_a8(x, packed, scale, 200, fmt, bias=bias))


def test_fallback_warns_once():
    codes, packed, x = _problem(2, 4, 100, "2bit")
    scale = torch.tensor(0.5)
    try:
        _ext.disable_extension(True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            a = ops.linear_a8(x, packed, scale, 100)
            b = ops.linear_a16(x, packed, scale, 100)
            ops.linear_a8(x, packed, scale, 100)
        msgs = [w for w in rec if "compiled kernels unavailable" in str(w.message)]
        assert len(msgs) == 1
        assert torch.equal(a, reference.linear_a8(x, packed, scale, 100))
        assert torch.equal(b, reference.linear_a16(x, packed, scale, 100))
    finally:
        _ext.disable_extension(False)
    assert _ext.is_available()


def test_nothing_compiled_is_imported_at_package_import():
    code = ("import sys, ternlm, ternlm.kernels, ternlm.nn.ternary_linear, ternlm.quant.pack; "
            "assert 'ternlm._C' not in sys.modules, 'extension imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("nh,hs,L,pos", [(1, 16, 4, 0), (12, 64, 160, 0), (12, 64, 160, 97), (3, 24, 9, 8),
                                         (4, 40, 33, 32)])
def test_attn_decode_matches_reference(level, nh, hs, L, pos):
    g = torch.Generator().manual_seed(nh * 1000 + pos)
    qkv = torch.randn(3 * nh * hs, generator=g)
    kc = torch.randn(nh, L, hs, generator=g)
    vc = torch.randn(nh, L, hs, generator=g)
    kr, vr = kc.clone(), vc.clone()
    want = reference.attn_decode(qkv, kr, vr, pos, hs ** -0.5)
    k2, v2 = kc.clone(), vc.clone()
    got = ops.attn_decode(qkv, k2, v2, pos, hs ** -0.5, backend="native")
    assert torch.equal(k2, kr) and torch.equal(v2, vr)  # the cache rows are written exactly
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attn_decode_checks_shapes():
    kc = torch.zeros(2, 4, 8)
    with pytest.raises(TernlmError):
        ops.attn_decode(torch.zeros(47), kc, kc.clone(), 0, 1.0)
    with pytest.raises(TernlmError):
        ops.attn_decode(torch.zeros(48), kc, kc.clone(), 4, 1.0)


@pytest.mark.parametrize("nh,nkv,hs,L,pos,rope", [(9, 3, 64, 40, 17, False), (9, 3, 64, 40, 0, True),
                                                  (9, 3, 64, 40, 39, True), (4, 4, 16, 8, 5, True),
                                                  (8, 1, 32, 12, 11, True)])
def test_attn_decode_gqa_rope_matches_reference(level, nh, nkv, hs, L, pos, rope):
    g = torch.Generator().manual_seed(nh * 100 + nkv * 10 + pos)
    qkv = torch.randn((nh + 2 * nkv) * hs, generator=g)
    kc, vc = torch.randn(nkv, L, hs, generator=g), torch.randn(nkv, L, hs, generator=g)
    cos, sin = (torch.randn(hs, generator=g), torch.randn(hs, generator=g)) if rope else (None, None)
    kr, vr = kc.clone(), vc.clone()
    want = reference.attn_decode(qkv, kr, vr, pos, hs ** -0.5, nh, cos, sin)
    k2, v2 = kc.clone(), vc.clone()
    got = ops.attn_decode(qkv, k2, v2, pos, hs ** -0.5, backend="native", n_head=nh, cos=cos, sin=sin)
    assert torch.equal(k2, kr) and torch.equal(v2, vr)  # rotated k and v are cached bit for bit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("layered", [False, True])
def test_attn_decode_batch_is_each_sequence_alone(level, rope, layered):
    # 3 of 5 slots at different positions, GQA: every row (and every written cache row) is what one
    # attn_decode call on that slot's cache gives, bit for bit; the other slots' caches are untouched
    nh, nkv, hs, L, B, n_layer, layer = 9, 3, 64, 40, 5, 2, 1
    g = torch.Generator().manual_seed(7 + rope + 2 * layered)
    shape = (B, n_layer, nkv, L, hs) if layered else (B, nkv, L, hs)
    kc, vc = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    cos, sin = (torch.randn(L, hs, generator=g), torch.randn(L, hs, generator=g)) if rope else (None, None)
    slots, pos = [4, 0, 2], [39, 0, 17]
    qkv = torch.randn(3, (nh + 2 * nkv) * hs, generator=g)
    k2, v2 = kc.clone(), vc.clone()
    got = ops.attn_decode_batch(qkv, k2, v2, slots, pos, hs ** -0.5, layer=layer if layered else None, n_head=nh,
                                cos=cos, sin=sin, backend="native")
    kr, vr = kc.clone(), vc.clone()
    for j, (s, p) in enumerate(zip(slots, pos)):
        ks, vs = (kr[s, layer], vr[s, layer]) if layered else (kr[s], vr[s])
        one = ops.attn_decode(qkv[j], ks, vs, p, hs ** -0.5, backend="native", n_head=nh,
                              cos=None if cos is None else cos[p], sin=None if sin is None else sin[p])
        assert torch.equal(got[j], one)
        want = reference.attn_decode(qkv[j], ks.clone(), vs.clone(), p, hs ** -0.5, nh,
                                     None if cos is None else cos[p], None if sin is None else sin[p])
        torch.testing.assert_close(got[j], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(k2, kr) and torch.equal(v2, vr)
    ref = ops.attn_decode_batch(qkv, kc.clone(), vc.clone(), slots, pos, hs ** -0.5,
                                layer=layer if layered else None, n_head=nh, cos=cos, sin=sin, backend="reference")
    torch.testing.assert_close(ref, got, rtol=1e-5, atol=1e-6)


def test_attn_decode_batch_checks_its_arguments():
    kc = torch.zeros(2, 3, 4, 8)
    q = torch.zeros(1, 12 * 8)
    with pytest.raises(TernlmError, match="slots"):
        ops.attn_decode_batch(q, kc, kc.clone(), [2], [0], 1.0, n_head=6)
    with pytest.raises(TernlmError, match="positions"):
        ops.attn_decode_batch(q, kc, kc.clone(), [0], [4], 1.0, n_head=6)
    with pytest.raises(TernlmError, match="layer"):
        ops.attn_decode_batch(q, kc[None], kc[None].clone(), [0], [0], 1.0, n_head=6)
    with pytest.raises(TernlmError, match="expected qkv"):
        ops.attn_decode_batch(torch.zeros(2, 12 * 8), kc, kc.clone(), [0], [0], 1.0, n_head=6)


def test_attn_decode_gqa_checks_shapes():
    kc = torch.zeros(3, 4, 8)
    with pytest.raises(TernlmError, match="multiple"):
        ops.attn_decode(torch.zeros(13 * 8), kc, kc.clone(), 0, 1.0, n_head=7)
    with pytest.raises(TernlmError, match="cos and sin"):
        ops.attn_decode(torch.zeros(12 * 8), kc, kc.clone(), 0, 1.0, n_head=6, cos=torch.zeros(8))
