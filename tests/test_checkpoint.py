import json

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ternlm import checkpoint
from ternlm.checkpoint import QUANT_FILE, WEIGHTS_FILE, from_pretrained, save_pretrained
from ternlm.config import TernaryConfig
from ternlm.conversion import convert, ternary_linears
from ternlm.errors import TernlmError
from ternlm.nn.ternary_linear import TernaryLinear


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=40, vocab_size=50257)).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50257,
                                        bos_token_id=50256, eos_token_id=50256)).eval()


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory, gpt2_tokenizer):
    model = convert(gpt2(), TernaryConfig(granularity="per_channel", act_bits=8), fmt="base3")
    out = save_pretrained(model, gpt2_tokenizer, tmp_path_factory.mktemp("ck") / "tiny-ternary")
    return model, out


def _assert_same_state(a, b):
    """b (loaded) holds a's tensors; a tied head is the embedding's rows there (a RowHead, no tensor
    of its own)."""
    from ternlm.nn.embedding import RowHead

    sa, sb = a.state_dict(), b.state_dict()
    head = b.get_output_embeddings()
    if isinstance(head, RowHead) and head.tied:
        sa = {k: v for k, v in sa.items() if not k.startswith("lm_head.")}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_directory_layout_and_record(saved_gpt2):
    model, out = saved_gpt2
    files = {p.name for p in out.iterdir()}
    assert {"config.json", QUANT_FILE, WEIGHTS_FILE, "tokenizer.json"} <= files
    rec = json.loads((out / QUANT_FILE).read_text())
    assert rec["format_version"] == checkpoint.FORMAT_VERSION and rec["method"] == "ternary"
    assert (rec["fmt"], rec["act_bits"], rec["granularity"]) == ("base3", 8, "per_channel")
    assert rec["targets"] == [n for n, _ in ternary_linears(model)]
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        assert json.loads(f.metadata()["ternlm_quantization"]) == rec
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.0.attn.c_attn.packed").dtype == torch.uint8
    assert "lm_head.weight" not in keys  # tied to wte, re-tied on load
    assert not list(out.parent.glob(".tiny-ternary.tmp-*"))


def test_round_trip_is_exact_and_generates_the_same_tokens(saved_gpt2, gpt2_tokenizer):
    model, out = saved_gpt2
    loaded = from_pretrained(out)
    _assert_same_state(model, loaded)
    assert loaded.lm_head.tied and loaded.lm_head.rows is loaded.transformer.wte.weight
    assert loaded.ternlm_targets == model.ternlm_targets
    ids = gpt2_tokenizer("The quick brown fox", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
    assert torch.equal(model.generate(ids, **kw), loaded.generate(ids, **kw))


def test_loading_never_materialises_float_ternary_weights(saved_gpt2, monkeypatch):
    model, out = saved_gpt2

    def forbidden(*a, **k):
        raise AssertionError("a ternary weight was unpacked or re-quantized during loading")

    # every path that could turn packed codes back into a dense weight
    monkeypatch.setattr("ternlm.nn.ternary_linear.unpack", forbidden)
    monkeypatch.setattr("ternlm.kernels.reference.dequantize", forbidden)
    monkeypatch.setattr("ternlm.nn.ternary_linear.ternarize", forbidden)
    loaded = from_pretrained(out)
    monkeypatch.undo()

    shapes = {(m.out_features, m.in_features) for _, m in ternary_linears(loaded)}
    shapes |= {s[::-1] for s in shapes}
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert not t.is_meta, name
        if t.is_floating_point():
            assert tuple(t.shape) not in shapes, f"{name} is a float tensor of a ternary layer's shape"
    for _, m in ternary_linears(loaded):
        assert m.packed.dtype == torch.uint8 and m.scale.dtype == torch.float32


def test_llama_round_trip_rebuilds_rotary_buffers(tmp_path, gpt2_tokenizer):
    model = convert(llama(), TernaryConfig(granularity="per_group", group_size=32))
    out = save_pretrained(model, gpt2_tokenizer, tmp_path / "llama")
    loaded = from_pretrained(out)
    _assert_same_state(model, loaded)
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.tensor([[464, 2068, 7586, 21831]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_replaces_an_existing_directory(tmp_path):
    first = save_pretrained(convert(gpt2()), None, tmp_path / "ck")
    (first / "stale.txt").write_text("old")
    second = save_pretrained(convert(gpt2(), fmt="base3"), None, tmp_path / "ck")
    assert second == first and not (second / "stale.txt").exists()
    assert json.loads((second / QUANT_FILE).read_text())["fmt"] == "base3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_quantize_from_a_plain_hf_directory(tmp_path, gpt2_tokenizer):
    from ternlm.quantization import QuantizeConfig, quantize

    src = tmp_path / "fp"
    gpt2().save_pretrained(src)
    gpt2_tokenizer.save_pretrained(src)
    out = quantize(src, tmp_path / "q", QuantizeConfig(fmt="base3", act_bits=None))
    loaded = from_pretrained(out)
    assert len(ternary_linears(loaded)) == 8
    assert {(m.fmt, m.act_bits) for _, m in ternary_linears(loaded)} == {("base3", None)}
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(TernlmError, match="is already a packed ternary model"):
        quantize(out, tmp_path / "q2")
    with pytest.raises(TernlmError, match="unknown fmt '3bit'; choose one of 2bit, base3"):
        QuantizeConfig(fmt="3bit")


def test_save_refuses_an_unconverted_model(tmp_path):
    with pytest.raises(TernlmError, match="convert it first"):
        save_pretrained(gpt2(), None, tmp_path / "x")


# ---- bad checkpoints: one-line TernlmError, never a traceback from safetensors/json/torch


@pytest.fixture
def ck(tmp_path):
    return save_pretrained(convert(gpt2()), None, tmp_path / "ck")


def _raises_one_line(d, match):
    with pytest.raises(TernlmError, match=match) as e:
        from_pretrained(d)
    assert "\n" not in str(e.value)


def test_truncated_weights(ck):
    data = (ck / WEIGHTS_FILE).read_bytes()
    (ck / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    _raises_one_line(ck, "corrupt or truncated")


def test_corrupt_header(ck):
    data = bytearray((ck / WEIGHTS_FILE).read_bytes())
    data[8:16] = b"{garbage"
    (ck / WEIGHTS_FILE).write_bytes(bytes(data))
    _raises_one_line(ck, "corrupt or truncated")


def test_not_a_safetensors_file(ck):
    (ck / WEIGHTS_FILE).write_bytes(b"\x80\x04pickle?")
    _raises_one_line(ck, "corrupt or truncated")


def test_missing_record(ck):
    (ck / QUANT_FILE).unlink()
    _raises_one_line(ck, "not a ternlm checkpoint")


def test_wrong_format_version(ck):
    rec = json.loads((ck / QUANT_FILE).read_text())
    rec["format_version"] = 99
    (ck / QUANT_FILE).write_text(json.dumps(rec))
    _raises_one_line(ck, "format version 99")


def test_record_and_weights_from_different_saves(ck):
    rec = json.loads((ck / QUANT_FILE).read_text())
    rec["act_bits"] = 8
    (ck / QUANT_FILE).write_text(json.dumps(rec))
    _raises_one_line(ck, "do not belong together")


def test_shape_mismatch(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["n_embd"] = 128
    (ck / "config.json").write_text(json.dumps(cfg))
    _raises_one_line(ck, "shape")


def test_missing_weights_file(ck):
    (ck / WEIGHTS_FILE).unlink()
    _raises_one_line(ck, "no model.safetensors")


def test_loaded_layers_are_ternary_linear(ck):
    m = from_pretrained(ck, kernel="reference")
    assert all(isinstance(m.get_submodule(n), TernaryLinear) and m.get_submodule(n).kernel == "reference"
               for n in m.ternlm_targets)


def test_sharded_checkpoint_errors_name_the_file(tmp_path):
    from tests.streaming.test_streaming import tiny_llama
    from ternlm.quantization import QuantizeConfig
    from ternlm.streaming import stream_quantize

    out = stream_quantize(tiny_llama(tmp_path / "src"), tmp_path / "q", QuantizeConfig(), progress=False)
    assert not (out / WEIGHTS_FILE).exists() and (out / checkpoint.INDEX_FILE).is_file()
    assert "6 shards" in checkpoint.checkpoint_summary(out)
    index = json.loads((out / checkpoint.INDEX_FILE).read_text())
    # the index's record must be the directory's record
    index["metadata"]["ternlm_quantization"]["fmt"] = "base3"
    (out / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(TernlmError, match="different ternlm_quantization.json"):
        from_pretrained(out)
    index["metadata"]["ternlm_quantization"]["fmt"] = "2bit"
    (out / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(TernlmError, match=f"names {shard.name}, which does not exist"):
        from_pretrained(out)


def test_checkpoint_of_the_earlier_2bit_layout_loads(tmp_path, gpt2_tokenizer):
    """Checkpoints written when 2-bit rows were padded to whole 256-weight blocks (64-wide rows took
    64 bytes, not 16) load into the current layout, through both the HF model and the lean engine."""
    from safetensors.torch import load_file, save_file

    from ternlm.quant.pack import unpack_2bit
    from ternlm.runtime import DecodeEngine

    model = convert(llama(), TernaryConfig(act_bits=8))
    out = save_pretrained(model, gpt2_tokenizer, tmp_path / "llama")
    path = out / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    for k, v in list(state.items()):
        if k.endswith(".packed"):  # rewrite as the earlier layout: codes of each row padded to 256
            in_f = model.get_submodule(k[: -len(".packed")]).in_features
            u = torch.ones(v.shape[0], 256, dtype=torch.uint8)
            u[:, :in_f] = (unpack_2bit(v, (v.shape[0], in_f)) + 1).to(torch.uint8)
            u = u.reshape(v.shape[0], 1, 4, 64)
            state[k] = (u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)).reshape(v.shape[0], 64)
    save_file(state, str(path), metadata=meta)
    loaded = from_pretrained(out)
    _assert_same_state(model, loaded)
    ids = torch.tensor([[464, 2068, 7586, 21831]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    lean = DecodeEngine.from_checkpoint(out)
    assert lean.generate(ids[0], 5)["tokens"] == DecodeEngine(model).generate(ids[0], 5)["tokens"]

