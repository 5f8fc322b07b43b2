import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ternlm.config import QuantConfig, TernaryConfig
from ternlm.conversion import convert, ternary_linears
from ternlm.errors import TernlmError
from ternlm.kernels import reference
from ternlm.nn.bitlinear import BitLinear
from ternlm.nn.surgery import quantize_model
from ternlm.nn.ternary_linear import TernaryLinear


def gpt2(width=64):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=width, n_head=4, n_positions=32, vocab_size=96,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama(width=64):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=width, intermediate_size=2 * width,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        bos_token_id=0, eos_token_id=0)).eval()


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _target_bytes(model, names) -> int:
    return sum(_nbytes(model.get_submodule(n)) for n in names)


def _weight_bytes(model, names) -> int:
    """Bytes of the layers' weights alone: fp32 weight, or packed codes + scales."""
    total = 0
    for n in names:
        m = model.get_submodule(n)
        ts = [m.packed, m.scale] if isinstance(m, TernaryLinear) else [m.weight]
        total += sum(t.numel() * t.element_size() for t in ts)
    return total


@pytest.mark.parametrize("build", [gpt2, llama])
@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_ptq_packs_block_linears_and_shrinks_them_16x(build, fmt):
    # widths that are whole 2-bit blocks (256), so the byte counts carry no row padding
    model = build(256)
    ids = torch.randint(0, 96, (2, 7))
    bit = quantize_model(build(256), TernaryConfig())  # the BitLinear forward of the same weights
    targets = bit.ternlm_targets
    before_total, before_layers = _nbytes(model), _target_bytes(model, targets)
    before_weights = _weight_bytes(model, targets)

    convert(model, fmt=fmt)

    assert sorted(n for n, _ in ternary_linears(model)) == sorted(targets)
    assert all(m.packed.dtype == torch.uint8 and m.act_bits is None for _, m in ternary_linears(model))
    after_layers = _target_bytes(model, targets)
    # fp32 (32 bits) -> 2 bits per weight (base-3's 1.6 bits pad 256 to 320 here): 16x, less the scales
    assert _weight_bytes(model, targets) * 15.9 < before_weights
    assert after_layers * 14 < before_layers  # the fp32 biases stay
    assert before_total - _nbytes(model) == before_layers - after_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, bit(ids).logits, rtol=1e-4, atol=1e-4)
    assert model.ternlm_targets == targets and model.ternlm_format == fmt
    assert model.ternlm_quant_config.weights.act_bits is None


def test_qat_model_converts_with_its_trained_codes_and_scales():
    qat = quantize_model(gpt2(), TernaryConfig(granularity="per_channel", scale_mode="fit"))
    with torch.no_grad():  # latent weights away from their init, as after training
        for m in qat.modules():
            if isinstance(m, BitLinear):
                m.weight.add_(torch.randn_like(m.weight) * 0.01)
    expected = {n: m.ternary() for n, m in qat.named_modules() if isinstance(m, BitLinear)}
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        y_bit = qat(ids).logits
    convert(qat)
    for name, m in ternary_linears(qat):
        t = m.ternary()
        assert torch.equal(t.codes, expected[name].codes) and torch.equal(t.scale, expected[name].scale)
        assert m.granularity == "per_channel"
    assert not any(isinstance(m, BitLinear) for m in qat.modules())
    with torch.no_grad():
        torch.testing.assert_close(qat(ids).logits, y_bit, rtol=1e-4, atol=1e-4)


def test_w158a8_layers_match_the_kernel_reference():
    model = convert(gpt2(), TernaryConfig(act_bits=8))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, TernaryLinear) and layer.act_bits == 8
    x = torch.randn(5, 64)
    expected = reference.linear_a8(x, layer.packed, layer.scale, 64, "2bit", 8, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 96, (1, 5))).logits).all()


def test_act_bits_override_and_include_patterns():
    model = convert(gpt2(), QuantConfig(weights=TernaryConfig(act_bits=8), include=("*.mlp.*",)), act_bits=None)
    names = sorted(n for n, _ in ternary_linears(model))
    assert names == sorted(f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj"))
    assert all(m.act_bits is None for _, m in ternary_linears(model))
    assert model.ternlm_quant_config.include == ("*.mlp.*",)


def test_refusals():
    with pytest.raises(TernlmError, match="already converted"):
        convert(convert(gpt2()))
    with pytest.raises(TernlmError, match="format"):
        convert(gpt2(), fmt="3bit")
    qat = quantize_model(gpt2(), TernaryConfig(granularity="per_channel"))
    with pytest.raises(TernlmError, match="trained with granularity"):
        convert(qat, TernaryConfig(granularity="per_tensor"))
    with pytest.raises(TernlmError, match="act_bits"):
        convert(gpt2(), act_bits=3)


def test_converted_forward_equals_dequantized_reference():
    model = convert(llama(), TernaryConfig(granularity="per_group", group_size=32))
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize_weight()), rtol=1e-5, atol=1e-5)


_RSS_SCRIPT = r"""
import gc, json, torch
from transformers import GPT2Config, GPT2LMHeadModel
from ternlm.conversion import convert
from ternlm.eval.cost import release_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=512, n_head=8, n_positions=64, vocab_size=256)).eval()
gc.collect()
before = rss_mb()
block = sum(p.numel() * 4 for n, p in model.named_parameters() if ".h." in n and n.endswith("weight") and p.dim() == 2)
convert(model)
release_freed_memory()
print(json.dumps({"before": before, "after": rss_mb(), "block_mb": block / 2**20}))
"""


def test_convert_lowers_rss():
    """RSS, not just tensor bytes: the fp32 block weights (48 MiB here) leave the process."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    expected_drop = m["block_mb"] * (1 - 1 / 16)  # 2-bit codes are 1/16 of fp32
    assert m["before"] - m["after"] > 0.8 * expected_drop, m
