"""Streaming pt-bitnet: the in-memory run's tensors bit for bit, one block in memory, resumable."""

import json

import pytest
import torch

from tests.conftest import require_data
from tests.streaming.test_streaming import assert_same_tensors
from ternlm.errors import TernlmError
from ternlm.quantization import PTQ_LOG, QuantizeConfig, quantize
from ternlm.streaming import quantize as sq
from ternlm.streaming import stream_quantize


def _model_dir(path, arch, *, tie=False, dtype=None):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(require_data("gpt2-tokenizer")))
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, tie_word_embeddings=tie))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=128))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="2MB")
    tok.save_pretrained(path)
    return path


def _cfg(**kw):
    return QuantizeConfig(method="pt-bitnet", calib=str(require_data("wikitext-2", "tokens.valid.txt")),
                          calib_tokens=256, seq_len=64, group_size=32, reconstruct_steps=2, **kw)


@pytest.mark.parametrize("arch,kw,qc", [  # (untied Llama: the resume test below)
    ("llama", dict(tie=True, dtype=torch.bfloat16), dict(fmt="base3", act_bits=None, float_dtype="bf16")),
    ("gpt2", dict(), dict()),
])
def test_streaming_ptbitnet_equals_in_memory(tmp_path, arch, kw, qc):
    src = _model_dir(tmp_path / "src", arch, **kw)
    cfg = _cfg(**qc)
    mem = quantize(src, tmp_path / "mem", cfg, progress=False, stream=False)
    st = quantize(src, tmp_path / "st", cfg, progress=False, stream=True)
    assert (st / "model.safetensors.index.json").is_file()
    assert_same_tensors(mem, st)
    for name in ("config.json", "ternlm_quantization.json"):
        assert (mem / name).read_text() == (st / name).read_text(), name
    a, b = json.loads((mem / PTQ_LOG).read_text()), json.loads((st / PTQ_LOG).read_text())
    assert a["blocks"] == b["blocks"] and b["streaming"] is True
    assert not sq.partial_dir(st).exists()
    from ternlm import load

    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(load(mem).model(ids).logits, load(st).model(ids).logits)


def test_streaming_ptbitnet_resumes_where_an_unbroken_run_ends(tmp_path, monkeypatch):
    import ternlm.ptq.quantize as pq

    src = _model_dir(tmp_path / "src", "llama")
    cfg = _cfg()
    whole = stream_quantize(src, tmp_path / "whole", cfg, progress=False)
    real, calls = pq.quantize_block, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the third block
        return real(*a, **k)

    monkeypatch.setattr(pq, "quantize_block", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_quantize(src, out, cfg, progress=False)
    part = sq.partial_dir(out)
    assert not out.exists() and (part / sq.INCOMPLETE).is_file()
    prog = json.loads((part / sq.PROGRESS_FILE).read_text())
    assert prog["done"] == ["model.layers.0", "model.layers.1"]
    assert sorted(p.name for p in part.glob("calib_state_*")) == [prog["state"]["calib_state"]]
    with pytest.raises(TernlmError, match="different source or settings"):
        stream_quantize(src, out, _cfg(seed=1), resume=True, progress=False)
    monkeypatch.setattr(pq, "quantize_block", real)
    stream_quantize(src, out, cfg, resume=True, progress=False)
    assert_same_tensors(whole, out)
    assert json.loads((whole / PTQ_LOG).read_text())["blocks"] == json.loads((out / PTQ_LOG).read_text())["blocks"]


def test_streaming_ptbitnet_bad_input_before_work(tmp_path):
    src = _model_dir(tmp_path / "src", "llama")
    with pytest.raises(TernlmError, match="calibration"):
        stream_quantize(src, tmp_path / "o", QuantizeConfig(method="pt-bitnet", calib=str(tmp_path / "nope.txt")),
                        progress=False)
    assert not sq.partial_dir(tmp_path / "o").exists()
    from tests.streaming.test_streaming import tiny_llama

    bare = tiny_llama(tmp_path / "bare")  # weights and config, no tokenizer
    with pytest.raises(TernlmError, match="no tokenizer files"):
        stream_quantize(bare, tmp_path / "o", _cfg(), progress=False)
    assert not sq.partial_dir(tmp_path / "o").exists()
