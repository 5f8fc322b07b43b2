"""The decode engine built straight from a checkpoint directory (``DecodeEngine.from_checkpoint``) equals
the engine built from the loaded Hugging Face model, bit for bit, without building that model."""

import json

import pytest
import torch

from ternlm.checkpoint import save_pretrained
from ternlm.config import QuantConfig, TernaryConfig
from ternlm.conversion import convert
from ternlm.errors import TernlmError
from ternlm.models.loading import load
from ternlm.runtime import DecodeEngine, RuntimeConfig

transformers = pytest.importorskip("transformers")


def _gpt2(exclude=()):
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                                             vocab_size=211, bos_token_id=0, eos_token_id=0)).eval()
    return convert(m, QuantConfig(weights=TernaryConfig(act_bits=8), exclude=list(exclude)))


def _llama(exclude=(), **kw):
    torch.manual_seed(0)
    args = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=211, max_position_embeddings=64, tie_word_embeddings=True,
                rope_theta=100000.0)
    args.update(kw)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).eval()
    return convert(m, QuantConfig(weights=TernaryConfig(granularity="per_group", group_size=32, act_bits=8),
                                  exclude=list(exclude)))


CASES = {
    "gpt2": lambda: _gpt2(),
    "gpt2, float c_proj (Conv1D)": lambda: _gpt2(exclude=["*.attn.c_proj"]),
    "llama, per-group scales, GQA": lambda: _llama(),
    "llama, untied head, float down_proj": lambda: _llama(exclude=["*.down_proj"], tie_word_embeddings=False),
}


@pytest.fixture(params=[(c, e) for c in CASES for e in ("float", "int8")], ids=lambda p: f"{p[0]}-{p[1]} rows")
def ckpt(request, tmp_path):
    case, embed = request.param
    return save_pretrained(CASES[case](), None, tmp_path / "ck", float_dtype="fp16", embed_dtype=embed)


@pytest.mark.parametrize("head", ["fp32", "fp16", "int8"])
def test_engine_from_the_directory_equals_the_engine_from_the_model(ckpt, head):
    model, _ = load(ckpt, tokenizer=False)
    ref = DecodeEngine(model, RuntimeConfig(head=head, max_seq_len=48))
    got = DecodeEngine.from_checkpoint(ckpt, RuntimeConfig(head=head, max_seq_len=48))
    assert got.arch == ref.arch
    ids = torch.randint(0, 211, (9,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.logits(ids), ref.logits(ids))
    assert got.generate(ids, 16)["tokens"] == ref.generate(ids, 16)["tokens"]
    # the embedding stays in the dtype it is stored in (fp16 by default, or int8 rows), not widened
    stored = torch.int8 if (ckpt / "ternlm_quantization.json").read_text().count('"int8"') else torch.float16
    assert got.wte.dtype == ref.wte.dtype == stored
    assert (got.wte_scale is not None) == (stored == torch.int8)
    if stored == torch.int8 and head == "int8":  # the int8 head reads the stored rows: no second table
        tied = got.arch.tied_head
        assert (got.head.w.data_ptr() == got.wte.data_ptr()) == tied
    if stored == torch.int8:  # the compiled step reads int8 rows too, and agrees with the Python step
        py = DecodeEngine.from_checkpoint(ckpt, RuntimeConfig(head=head, max_seq_len=48, step="python"))
        assert py.generate(ids, 16)["tokens"] == got.generate(ids, 16)["tokens"]


def test_int8_rows_run_in_the_compiled_step(tmp_path):
    """An int8 embedding (tied int8 head) goes through the compiled step: same tokens as the Python
    step, and the file holds no float copy of the table."""
    from safetensors import safe_open

    ck = save_pretrained(_gpt2(), None, tmp_path / "ck", float_dtype="fp16", embed_dtype="int8")
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.qweight").dtype == torch.int8 and "transformer.wte.weight" not in f.keys()
    got = DecodeEngine.from_checkpoint(ck, RuntimeConfig(head="int8", max_seq_len=48))
    py = DecodeEngine.from_checkpoint(ck, RuntimeConfig(head="int8", max_seq_len=48, step="python"))
    assert got.step == "compiled" and py.step == "python"
    ids = torch.randint(0, 211, (9,), generator=torch.Generator().manual_seed(2))
    assert got.generate(ids, 20)["tokens"] == py.generate(ids, 20)["tokens"]


def test_what_the_direct_reader_does_not_cover_is_a_one_line_error(tmp_path):
    ck = save_pretrained(_llama(), None, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TernlmError, match="default RoPE only, not 'linear'"):
        DecodeEngine.from_checkpoint(ck)
    (ck / "ternlm_knowledge.safetensors").write_bytes(b"")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TernlmError, match="knowledge tokens"):
        DecodeEngine.from_checkpoint(ck)
    cfg["model_type"] = "mistral"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TernlmError, match="runs gpt2, llama, qwen2 models, not 'mistral'"):
        DecodeEngine.from_checkpoint(ck)
    with pytest.raises(TernlmError, match="no such checkpoint directory"):
        DecodeEngine.from_checkpoint(tmp_path / "nope")


def test_truncated_weights_are_a_one_line_error(tmp_path):
    ck = save_pretrained(_gpt2(), None, tmp_path / "ck")
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(TernlmError, match="corrupt or truncated"):
        DecodeEngine.from_checkpoint(ck)


def test_cli_generate_builds_no_hugging_face_model(tmp_path, gpt2_tokenizer, monkeypatch, capsys):
    """`ternlm generate` on a ternlm checkpoint runs the engine read from the files: the model loader
    is never called, and the tokens equal those of the engine built from the loaded model."""
    import ternlm.checkpoint as ckmod
    from ternlm.cli import main
    from ternlm.generate import GenerateConfig, generate_fast

    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                                             vocab_size=50257)).eval()
    ck = save_pretrained(convert(m, TernaryConfig(act_bits=8)), gpt2_tokenizer, tmp_path / "ck")
    model, tok = load(ck)
    want = generate_fast(model, tok, "Hello there", GenerateConfig(max_new_tokens=8, head="int8"))["text"]

    def no_model(*a, **k):
        raise AssertionError("the HF model was built")

    monkeypatch.setattr(ckmod, "from_pretrained", no_model)
    assert main(["generate", "--model", str(ck), "--prompt", "Hello there", "--max-new-tokens", "8",
                 "--head", "int8"]) == 0
    out, err = capsys.readouterr()
    assert "[fast engine; 8 tokens" in err
    assert out.rstrip("\n") == "Hello there" + want
