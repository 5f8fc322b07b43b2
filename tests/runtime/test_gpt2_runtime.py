"""GPT2Runtime against Hugging Face on tiny GPT-2s with packed ternary layers, and the head kernels
against their references."""

import pytest
import torch

from tests.conftest import require_data
from ternlm.config import TernaryConfig
from ternlm.conversion import convert
from ternlm.errors import TernlmError
from ternlm.kernels import _ext, ops, reference
from ternlm.quant.activations import quantize_activations
from ternlm.quant.int8 import quantize_int8
from ternlm.runtime import GPT2Runtime, RuntimeConfig

transformers = pytest.importorskip("transformers")
LEVELS = _ext.available_levels() or [None]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(require_data("gpt2-tokenizer"))


def _tiny(tokenizer, act_bits=8, fmt="2bit", ternary=True, seed=0, tcfg=None, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(tokenizer), **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    return convert(model, tcfg or TernaryConfig(act_bits=act_bits), fmt=fmt) if ternary else model


def _ids(tokenizer, text="The quick brown fox jumps over the lazy dog"):
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("act_bits,fmt", [(8, "2bit"), (8, "base3"), (None, "2bit")])
def test_greedy_equals_hf_generate(tokenizer, act_bits, fmt):
    model = _tiny(tokenizer, act_bits, fmt)
    ids = _ids(tokenizer)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    got = GPT2Runtime(model, RuntimeConfig(head="fp32")).generate(ids[0], 24)
    assert got["tokens"] == ref[0, ids.shape[1]:].tolist()
    assert got["n_prompt_tokens"] == ids.shape[1] and got["n_new_tokens"] == 24


def test_per_group_layers_run_bound_compiled_kernels(tokenizer):
    # groups of 96 over 64 / 256 inputs: partial last groups in every layer
    model = _tiny(tokenizer, tcfg=TernaryConfig(granularity="per_group", group_size=96, act_bits=8), fmt="base3")
    ids = _ids(tokenizer)
    rt = GPT2Runtime(model, RuntimeConfig(head="fp32"))
    want = "native" if _ext.is_available() else "reference"
    assert {f.backend for b in rt.blocks for f in (b.qkv, b.o, b.up, b.down)} == {want}
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert rt.generate(ids[0], 12)["tokens"] == ref[0, ids.shape[1]:].tolist()


def test_runtime_uses_only_public_kernel_names():
    import pathlib
    import re

    import ternlm

    root = pathlib.Path(ternlm.__file__).parent
    for path in root.rglob("*.py"):
        if path.parent.name == "kernels":
            continue
        src = path.read_text()
        assert not re.search(r"_geometry|_FMT_ID", src), path
        if path.parent.name == "runtime":
            assert "_QMAX" not in src and ".linear_a8(" not in src, path
        assert not re.search(r"from ternlm\.kernels(\.\w+)? import [^\n]*\b_\w+|ternlm\.kernels\._|kernels import _", src), path


@pytest.mark.parametrize("ternary", [True, False])
def test_kv_cache_decode_matches_full_forward(tokenizer, ternary):
    # float activations: no per-token int8 rounding that a 1-ulp difference could flip
    model = _tiny(tokenizer, None, ternary=ternary, seed=1)
    ids = _ids(tokenizer)[0]
    cont = torch.randint(0, len(tokenizer), (10,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(torch.cat([ids, cont]).unsqueeze(0)).logits[0]  # (T, V)
    rt = GPT2Runtime(model)
    T = ids.numel()
    torch.testing.assert_close(rt.prefill(ids, all_logits=True), full[:T], atol=1e-4, rtol=1e-4)
    rt.prefill(ids)
    for j, tok in enumerate(cont.tolist()):
        torch.testing.assert_close(rt.decode_step(tok), full[T + j], atol=1e-4, rtol=1e-4)
    assert rt.pos == T + cont.numel()


@pytest.mark.parametrize("head,tol", [("fp16", 1e-2), ("bf16", 5e-2), ("int8", 0.1)])
def test_reduced_heads_track_fp32(tokenizer, head, tol):
    model = _tiny(tokenizer, 8)
    ids = _ids(tokenizer)[0]
    ref = GPT2Runtime(model).prefill(ids, all_logits=True)
    got = GPT2Runtime(model, RuntimeConfig(head=head)).prefill(ids, all_logits=True)
    assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_sampling_is_seeded_and_top_k_1_is_greedy(tokenizer):
    rt = GPT2Runtime(_tiny(tokenizer, 8))
    ids = _ids(tokenizer)[0]
    greedy = rt.generate(ids, 12)["tokens"]
    assert rt.generate(ids, 12, temperature=0.7, top_k=1)["tokens"] == greedy
    a = rt.generate(ids, 12, temperature=1.5, top_p=0.9, seed=3)["tokens"]
    assert rt.generate(ids, 12, temperature=1.5, top_p=0.9, seed=3)["tokens"] == a


def test_limits_and_config_validation(tokenizer):
    rt = GPT2Runtime(_tiny(tokenizer), RuntimeConfig(max_seq_len=16))
    with pytest.raises(TernlmError):
        rt.generate(torch.arange(10), 8)
    with pytest.raises(TernlmError):
        RuntimeConfig(head="int4")
    with pytest.raises(TernlmError):
        GPT2Runtime(_tiny(tokenizer), RuntimeConfig(max_seq_len=65))


TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light")


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 8)])
def test_engine_and_hf_forward_give_the_same_perplexity(tokenizer, window, stride):
    """One perplexity implementation, two scorers (HF forward, the engine's prefill): same number."""
    from ternlm.eval.perplexity import perplexity

    model = _tiny(tokenizer, 8)
    hf = perplexity(model, tokenizer, TEXT, max_length=window, stride=stride)
    rt = perplexity(GPT2Runtime(model).logits, tokenizer, TEXT, max_length=window, stride=stride)
    assert hf["n_tokens"] == rt["n_tokens"] > 20
    assert abs(rt["perplexity"] - hf["perplexity"]) / hf["perplexity"] < 1e-4


def test_int8_head_perplexity_close(tokenizer):
    from ternlm.eval.perplexity import perplexity

    model = _tiny(tokenizer, 8)
    p32 = perplexity(GPT2Runtime(model).logits, tokenizer, TEXT, max_length=32, stride=32)["perplexity"]
    p8 = perplexity(GPT2Runtime(model, RuntimeConfig(head="int8")).logits, tokenizer, TEXT, max_length=32,
                    stride=32)["perplexity"]
    assert 1 < p32 < float("inf") and p8 != p32 and abs(p8 - p32) / p32 < 0.05


# ---- head kernels against their references ------------------------------------------------------

HEAD_SHAPES = [(1, 1, 1), (1, 7, 100), (1, 50, 768), (2, 9, 200), (3, 37, 64), (1, 1000, 130)]


@pytest.fixture(params=LEVELS)
def level(request):
    if request.param is None:
        pytest.skip("compiled kernels not built")
    with _ext.use_level(request.param):
        yield request.param


@pytest.mark.parametrize("M,N,K", HEAD_SHAPES)
def test_int8_head_kernel_exact(level, M, N, K):
    g = torch.Generator().manual_seed(M * 100 + N + K)
    t = quantize_int8(torch.randn(N, K, generator=g))
    w = ops.pad_int8_rows(t.q)
    x = torch.randn(M, K, generator=g) * 4
    bias = torch.randn(N, generator=g)
    # integer path: accumulators and the float epilogue are bitwise the reference's
    q, _ = quantize_activations(x, 8)
    assert torch.equal(ops.int8_accumulators(ops.pad_int8_rows(q), w), reference.a8_accumulators(q, t.q))
    assert torch.equal(ops.int8_linear(x, w, t.scale, K), reference.int8_linear_a8(x, w, t.scale, K))
    assert torch.equal(ops.int8_linear(x, w, t.scale, K, bias=bias),
                       reference.int8_linear_a8(x, w, t.scale, K, bias))
    # float activations: same math, another summation order
    torch.testing.assert_close(ops.int8_linear(x, w, t.scale, K, None), reference.int8_linear_a16(x, w, t.scale, K),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M,N,K", HEAD_SHAPES)
def test_int8_accumulators_exact_over_the_whole_int8_range(level, M, N, K):
    # -128 on both sides, and rows of all -128 against all -128 (the largest products there are)
    g = torch.Generator().manual_seed(7 * M + N + K)
    q = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    q[0] = -128
    w[0] = -128
    expect = q.to(torch.int64) @ w.to(torch.int64).T
    assert expect[0, 0] == 128 * 128 * K
    got = ops.int8_accumulators(ops.pad_int8_rows(q), ops.pad_int8_rows(w))
    assert torch.equal(got.to(torch.int64), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", HEAD_SHAPES)
def test_float_head_kernel(level, dtype, M, N, K):
    g = torch.Generator().manual_seed(M + N + K)
    w = ops.pad_int8_rows(torch.randn(N, K, generator=g).to(dtype))
    x = torch.randn(M, K, generator=g)
    out = torch.full((M, N), float("nan"))
    ops.float_rows_linear(x, w, K, out=out)
    torch.testing.assert_close(out, reference.float_rows_linear(x, w, K), atol=1e-4, rtol=1e-4)


def test_head_kernels_check_shapes():
    t = quantize_int8(torch.randn(5, 70))
    with pytest.raises(TernlmError):
        ops.int8_linear(torch.randn(1, 70), t.q, t.scale, 70)  # rows not padded to 64
    with pytest.raises(TernlmError):
        ops.float_rows_linear(torch.randn(1, 70), torch.randn(5, 70), 70)
