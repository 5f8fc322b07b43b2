"""ternlm quantize end to end: absmean and pt-bitnet on a tiny Llama, through the CLI."""

import json

import pytest
import torch

from tests.conftest import require_data
from ternlm.errors import TernlmError
from ternlm.quantization import PTQ_LOG, QuantizeConfig


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    tok = AutoTokenizer.from_pretrained(str(require_data("gpt2-tokenizer")))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_pt_bitnet_through_the_cli(llama_dir, tmp_path, capfd):
    from ternlm.cli import main
    from ternlm.models.loading import load
    from ternlm.nn.surgery import ternary_linears

    calib = require_data("wikitext-2", "tokens.valid.txt")
    out = tmp_path / "ptb"
    rc = main(["quantize", str(llama_dir), "-o", str(out), "--method", "pt-bitnet", "--calib", str(calib),
               "--calib-tokens", "256", "--seq-len", "64", "--group-size", "32", "--reconstruct-steps", "2",
               "--quiet"])
    assert rc == 0, capfd.readouterr().err
    log = json.loads((out / PTQ_LOG).read_text())
    assert log["quantize_config"]["method"] == "pt-bitnet" and log["n_targets"] == 14
    model, tok = load(out)
    layers = ternary_linears(model)
    assert len(layers) == 14
    for _, m in layers:  # 96 inputs in groups of 32 -> 3 groups; 64 -> 2
        assert m.granularity == "per_group" and m.scale.shape == (m.out_features, -(-m.in_features // 32))
    rc = main(["eval", str(out), "--text", str(require_data("wikitext-2", "wiki.test.raw")), "--window", "64",
               "--max-windows", "2", "--quiet"])
    assert rc == 0
    assert "perplexity" in capfd.readouterr().out


def test_config_errors():
    with pytest.raises(TernlmError, match="--method pt-bitnet needs calibration text"):
        QuantizeConfig(method="pt-bitnet")
    with pytest.raises(TernlmError, match="unknown method 'gptq'; choose one of absmean, pt-bitnet"):
        QuantizeConfig(method="gptq")
    with pytest.raises(TernlmError, match="--include/--exclude are not supported with --method pt-bitnet"):
        QuantizeConfig(method="pt-bitnet", calib="x.txt", include=("*.q_proj",))


def test_short_calibration_text_names_the_minimum(llama_dir, tmp_path):
    from ternlm.quantization import quantize

    short = tmp_path / "short.txt"
    short.write_text("only a few words of text")
    with pytest.raises(TernlmError, match=r"calibration text is too short: \d+ tokens, need at least 256"):
        quantize(llama_dir, tmp_path / "o", QuantizeConfig(method="pt-bitnet", calib=str(short), calib_tokens=256,
                                                           seq_len=64, group_size=32), progress=False)
    assert not (tmp_path / "o").exists()


def test_stream_options_checked(tmp_path, monkeypatch):
    from tests.streaming.test_streaming import tiny_llama
    from ternlm import quantization

    src = tiny_llama(tmp_path / "src")
    with pytest.raises(TernlmError, match="--resume"):
        quantization.quantize(src, tmp_path / "o", QuantizeConfig(), stream=False, resume=True, progress=False)
    with pytest.raises(TernlmError, match="random-init"):
        quantization.quantize(src, tmp_path / "o", QuantizeConfig(), stream=True, random_init=True, progress=False)
    # auto mode streams when the float32 model would not fit in half the free memory
    assert not quantization._should_stream(src, QuantizeConfig(), None, False)
    monkeypatch.setattr(quantization, "_available_memory", lambda: 1000)
    assert quantization._should_stream(src, QuantizeConfig(), None, False)
    assert quantization._should_stream(src, QuantizeConfig(method="pt-bitnet", calib="x"), None, False)
    out = quantization.quantize(src, tmp_path / "o", QuantizeConfig(), progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # streamed
