"""Streaming from a GGUF file: one tensor dequantized at a time, the in-memory path's tensors bit for bit."""

import numpy as np
import pytest
import torch

from tests.streaming.test_streaming import assert_same_tensors
from ternlm.errors import TernlmError
from ternlm.quantization import QuantizeConfig, quantize
from ternlm.streaming import quantize as sq


def tiny_llama_gguf(path, layers=2, hidden=64, inter=96, vocab=128):
    """A tiny Llama written by gguf-py: Q8_0 matrices, F32 norms, llama.cpp's q/k row order."""
    import gguf
    from gguf.quants import quantize as gq
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads, kv = 4, 2
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv, tie_word_embeddings=False))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def permute(w, n):  # llama.cpp's converter: rotary halves interleaved
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)

    def add(name, arr):
        if arr.ndim == 2:
            w.add_tensor(name, gq(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads))
        add(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qc", [dict(), dict(fmt="base3", granularity="per_group", group_size=32)])
def test_streaming_gguf_equals_in_memory(tmp_path, qc):
    g = tiny_llama_gguf(tmp_path / "tiny.gguf")
    cfg = QuantizeConfig(**qc)
    mem = quantize(g, tmp_path / "mem", cfg, progress=False, stream=False)
    st = quantize(g, tmp_path / "st", cfg, progress=False, stream=True)
    assert (st / "model.safetensors.index.json").is_file()
    assert_same_tensors(mem, st)
    for name in ("config.json", "ternlm_quantization.json"):
        assert (mem / name).read_text() == (st / name).read_text(), name
    assert "quantization_config" not in (mem / "config.json").read_text()  # the GGUF loader's record is dropped


def test_streaming_gguf_reads_one_tensor_as_transformers_does(tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ternlm.streaming.gguf_source import GGUFFiles
    from ternlm.streaming.plan import meta_model

    g = tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = meta_model(AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny.gguf"))
    files = GGUFFiles(g, model)
    ref = load_gguf_checkpoint(str(g), return_tensors=True, model_to_load=model)["tensors"]
    assert sorted(files.entries) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(files.get(k), v.float()), k
    # a truncated file is named before any work
    data = g.read_bytes()
    g.write_bytes(data[: len(data) - 64])
    with pytest.raises(TernlmError, match="truncated or corrupt"):
        GGUFFiles(g, model)
    with pytest.raises(TernlmError, match="truncated or corrupt"):
        quantize(g, tmp_path / "o", QuantizeConfig(), progress=False, stream=True)
    assert not (tmp_path / "o").exists() and not sq.partial_dir(tmp_path / "o").exists()
