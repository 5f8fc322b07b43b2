import math

import pytest
import torch
from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from ternlm.errors import TernlmError
from ternlm.eval.cost import current_rss_mb, latency_per_message, model_bytes, peak_rss_mb, weight_footprint

# tiny_gpt2_config: vocab V, context P, width E, L layers
V, P, E, L = 50257, 128, 32, 2
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
QUANT_WEIGHTS = L * (E * 3 * E + E * E + E * 4 * E + 4 * E * E)  # the four Conv1D weights per block
QUANT_ROWS = L * (3 * E + E + 4 * E + E)  # their output features
REST = (
    V * E + P * E  # wte (tied to lm_head, so counted once) and wpe
    + L * (2 * E + 3 * E + E + 2 * E + 4 * E + E)  # ln_1, c_attn b, c_proj b, ln_2, c_fc b, c_proj b
    + 2 * E  # ln_f
)


@pytest.fixture
def lm(tiny_gpt2_config):
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config)


def block_names():
    return [f"transformer.h.{i}.{n}" for i in range(L) for n in BLOCK_LINEARS]


def test_footprint_tiny_gpt2_by_hand(lm):
    f = weight_footprint(lm, block_names())
    assert f["n_params_quantized"] == QUANT_WEIGHTS == 24576
    assert f["n_params_total"] == QUANT_WEIGHTS + REST
    assert f["n_quantized_tensors"] == 8
    expected_quantized = {
        "fp32": 4 * QUANT_WEIGHTS,
        "fp16": 2 * QUANT_WEIGHTS,
        "int8": QUANT_WEIGHTS + 4 * QUANT_ROWS,
        "ternary_2bit": QUANT_WEIGHTS // 4 + 4 * 8,  # every tensor's size is a multiple of 4
        "ternary_log2_3": QUANT_WEIGHTS * math.log2(3) / 8 + 4 * 8,
    }
    for fmt, q in expected_quantized.items():
        rest = (2 if fmt == "fp16" else 4) * REST
        got = f["formats"][fmt]
        assert got["quantized_bytes"] == pytest.approx(q, abs=1e-6)
        assert got["rest_bytes"] == rest
        assert got["total_bytes"] == pytest.approx(q + rest, abs=1e-6)


def test_footprint_quantizing_tied_lm_head_counts_it_once(lm):
    plain = weight_footprint(lm, block_names())
    tied = weight_footprint(lm, block_names() + ["lm_head"])
    assert tied["n_params_total"] == plain["n_params_total"]
    assert tied["n_params_quantized"] == QUANT_WEIGHTS + V * E
    assert tied["formats"]["int8"]["quantized_bytes"] == QUANT_WEIGHTS + V * E + 4 * (QUANT_ROWS + V)
    assert tied["formats"]["int8"]["rest_bytes"] == 4 * (REST - V * E)
    assert tied["formats"]["fp32"]["total_bytes"] == plain["formats"]["fp32"]["total_bytes"]


def test_footprint_linear_vs_conv1d_orientation():
    # nn.Linear(3, 5).weight is (5, 3); Conv1D(nf=5, nx=3).weight is (3, 5): both 5 output rows.
    for layer in (nn.Linear(3, 5), Conv1D(5, 3)):
        f = weight_footprint(nn.Sequential(layer), ["0"])
        assert (f["n_params_total"], f["n_params_quantized"]) == (20, 15)
        assert f["formats"]["int8"]["quantized_bytes"] == 15 + 4 * 5
        assert f["formats"]["ternary_2bit"]["quantized_bytes"] == math.ceil(15 * 2 / 8) + 4  # 4 + 4
        assert f["formats"]["ternary_2bit"]["rest_bytes"] == 4 * 5  # the bias stays fp32


def test_footprint_needs_no_data(tiny_gpt2_config, lm):
    with torch.device("meta"):
        meta = GPT2LMHeadModel(tiny_gpt2_config)
    assert weight_footprint(meta, block_names()) == weight_footprint(lm, block_names())


@pytest.mark.parametrize("name, match", [("transformer.ln_f", "not nn.Linear"), ("nope.c_fc", "no module")])
def test_footprint_bad_names(lm, name, match):
    with pytest.raises(TernlmError, match=match):
        weight_footprint(lm, [name])


def test_model_bytes_counts_tied_weights_once_and_real_dtypes(lm):
    n_total = QUANT_WEIGHTS + REST
    assert model_bytes(lm) == 4 * n_total
    assert model_bytes(lm.half()) == 2 * n_total


def test_model_bytes_int8_buffers_and_shared_storage():
    m = nn.Module()
    m.register_buffer("codes", torch.zeros(10, 10, dtype=torch.int8))
    m.register_buffer("packed", torch.zeros(7, dtype=torch.uint8))
    m.scale = nn.Parameter(torch.ones(10))
    m.register_buffer("scale_view", m.scale.detach()[:5])  # shares the parameter's storage
    assert model_bytes(m) == 100 + 7 + 4 * 10


def test_latency(tiny_gpt2_config, gpt2_tokenizer):
    tiny_gpt2_config.num_labels = 2
    model = GPT2ForSequenceClassification(tiny_gpt2_config)
    texts = ["free prize call now", "see you at lunch", "ok", "win cash today", "hello there"]
    r = latency_per_message(model, gpt2_tokenizer, texts, batch_size=2, warmup=1, repeats=2)
    assert (r["batch_size"], r["n_batches"], r["n_messages"]) == (2, 3, 5)
    assert r["ms_per_message"] > 0
    assert r["ms_per_batch"] * 3 == pytest.approx(r["ms_per_message"] * 5)


def test_latency_bad_args(lm, gpt2_tokenizer):
    with pytest.raises(TernlmError):
        latency_per_message(lm, gpt2_tokenizer, [], batch_size=1)
    with pytest.raises(TernlmError):
        latency_per_message(lm, gpt2_tokenizer, ["hi"], batch_size=0)


def test_peak_rss_sees_a_freed_allocation():
    """The peak keeps the high-water mark of memory that is no longer resident."""
    from ternlm.eval.cost import release_freed_memory

    release_freed_memory()
    now = current_rss_mb()
    mb = peak_rss_mb() - now + 64  # enough to raise the high-water mark by ~64 MiB
    x = torch.ones(int(mb * 2**20) // 4)  # ones: every page touched
    del x
    release_freed_memory()
    assert 0 < current_rss_mb() < peak_rss_mb()
    assert peak_rss_mb() > now + 0.9 * mb


def test_reset_peak_rss_forgets_an_earlier_peak():
    """After a reset the peak is the peak of what ran since (per-stage peaks in the pipeline)."""
    import sys

    from ternlm.eval.cost import release_freed_memory, reset_peak_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("clear_refs is Linux-only")
    release_freed_memory()
    now = current_rss_mb()
    x = torch.ones(int((peak_rss_mb() - now + 128) * 2**20) // 4)
    del x
    release_freed_memory()
    high = peak_rss_mb()
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 64
