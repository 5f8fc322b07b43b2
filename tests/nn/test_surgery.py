import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from ternlm.config import Int8Config, LLMInt8Config, QuantConfig, TernaryConfig
from ternlm.errors import TernlmError
from ternlm.nn.bitlinear import BitLinear
from ternlm.nn.int8_linear import Int8Linear, LLMInt8Linear
from ternlm.nn.surgery import quantize_model
from ternlm.nn.verify import verify


def gpt2_cls():
    return GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                    n_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        bos_token_id=0, eos_token_id=0))


def bert():
    return BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=2, vocab_size=64, pad_token_id=0))


def _names(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def test_gpt2_default_targets_block_linears_only():
    m = quantize_model(gpt2_cls())
    expect = sorted(f"transformer.h.{i}.{p}" for i in range(2)
                    for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert _names(m, BitLinear) == expect
    assert isinstance(m.score, torch.nn.Linear) and not isinstance(m.score, BitLinear)
    assert isinstance(m.transformer.wte, torch.nn.Embedding)


def test_llama_targets_and_head_kept():
    m = quantize_model(llama())
    names = _names(m, BitLinear)
    assert len(names) == 2 * 7  # q,k,v,o,gate,up,down
    assert all(n.startswith("model.layers.") for n in names)
    assert not isinstance(m.lm_head, BitLinear)


def test_bert_targets_exclude_pooler_and_classifier():
    m = quantize_model(bert())
    names = _names(m, BitLinear)
    assert len(names) == 2 * 6  # q,k,v,attn out,intermediate,output
    assert all(n.startswith("bert.encoder.layer.") for n in names)
    assert not isinstance(m.bert.pooler.dense, BitLinear) and not isinstance(m.classifier, BitLinear)


def test_include_exclude_patterns():
    m = quantize_model(gpt2_cls(), QuantConfig(include=("*.mlp.*",), exclude=("transformer.h.1.*",)))
    assert _names(m, BitLinear) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    with pytest.raises(TernlmError):
        quantize_model(gpt2_cls(), QuantConfig(include=("nothing.*",)))


@pytest.mark.parametrize("cfg,cls", [(Int8Config(), Int8Linear), (Int8Config(scheme="zeropoint"), Int8Linear),
                                     (LLMInt8Config(backend="torch"), LLMInt8Linear)])
def test_int8_baselines_swap_and_stay_close(cfg, cls):
    torch.manual_seed(0)
    m = gpt2_cls().eval()
    x = torch.randint(1, 64, (2, 6))
    y0 = m(x).logits
    quantize_model(m, cfg)
    assert len(_names(m, cls)) == 8
    assert all(mod.qweight.dtype == torch.int8 for mod in m.modules() if isinstance(mod, cls))
    assert torch.allclose(m(x).logits, y0, atol=0.05)


def test_verify_passes_on_ternary_and_catches_unquantized_layer():
    m = quantize_model(gpt2_cls())
    rep = verify(m)
    assert rep.ok and rep.totals()["ternary_share"] == 1.0 and len(rep.layers) == 8
    assert 1.58 < rep.totals()["bits_per_weight"] < 1.7
    # put one original float layer back
    from transformers.pytorch_utils import Conv1D
    m.transformer.h[1].mlp.c_fc = Conv1D(128, 32)
    rep = verify(m)
    assert not rep.ok and rep.failed == ["transformer.h.1.mlp.c_fc"]
    assert "NOT TERNARY" in rep.format()


def test_verify_flags_unfinished_lambda_warmup():
    m = quantize_model(gpt2_cls(), TernaryConfig(lambda_warmup_steps=5))
    assert not verify(m).ok


def test_verify_on_float_model_uses_block_layers():
    rep = verify(llama())
    assert not rep.ok and len(rep.layers) == 14
