"""The architecture table: every row runs the whole path (quantize -> engine from the files and from the
model -> GGUF -> back, llama.cpp where installed -> zero-shot scorer), from a random tiny config."""

import pytest
import torch

from ternlm.arch import ROWS, Arch, row_for
from ternlm.errors import TernlmError


def tiny(model_type: str):
    """A random tiny model of the row's architecture (256 wide: whole 256-weight GGUF blocks)."""
    import transformers

    torch.manual_seed(0)
    if model_type == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4, n_inner=256, n_positions=128,
                                      vocab_size=50257)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=50257, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=50256,
                  eos_token_id=50256, tie_word_embeddings=True)
    if model_type == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=10000.0)).eval()
    if model_type == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=10000.0)).eval()
        with torch.no_grad():  # biases that matter, so the test sees them
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
        return m
    raise AssertionError(model_type)


def test_every_row_is_tested():
    assert set(ROWS) == {"gpt2", "llama", "qwen2"}  # a new row: add it to tiny() and the list above


@pytest.mark.parametrize("model_type", list(ROWS))
def test_a_row_reads_its_config_and_names_its_block(model_type):
    m = tiny(model_type)
    a = Arch.from_config(m.config)
    row = row_for(model_type)
    assert (a.model_type, a.n_layer, a.hidden) == (model_type, 2, 256)
    assert Arch.from_config(m.config.to_dict()) == a  # config.json dicts read alike
    block = m.get_submodule(row.block(0))
    for slot in row.linears:
        assert block.get_submodule(slot.path) is not None
    for name in (row.embed, row.final_norm, row.head) + ((row.pos_embed,) if row.pos_embed else ()):
        assert m.get_submodule(name) is not None
    from ternlm.ptq.arch import block_spec

    spec = block_spec(block)
    assert spec.kind != "generic" and [n for g in spec.groups for n in g] == [s.path for s in row.linears]
    assert a.attn_bias == (model_type == "qwen2")


@pytest.mark.parametrize("model_type", list(ROWS))
def test_a_row_runs_quantize_engine_gguf_and_the_scorer(model_type, tmp_path, gpt2_tokenizer):
    from ternlm import load
    from ternlm.checkpoint import save_model
    from ternlm.eval.loglik import LoglikScorer
    from ternlm.export.gguf import export_gguf, from_gguf
    from ternlm.quantization import QuantizeConfig, quantize
    from ternlm.runtime import DecodeEngine, RuntimeConfig

    save_model(tiny(model_type), gpt2_tokenizer, tmp_path / "src")
    ck = quantize(tmp_path / "src", tmp_path / "ck", QuantizeConfig(granularity="per_channel"), progress=False)
    model, tok = load(ck)
    ids = tok("The quick brown fox jumps over", return_tensors="pt").input_ids
    files = DecodeEngine.from_checkpoint(ck, RuntimeConfig(max_seq_len=64))
    mem = DecodeEngine(model, RuntimeConfig(max_seq_len=64))
    assert files.arch == mem.arch and files.step == "compiled"
    want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    assert files.generate(ids[0], 8)["tokens"] == mem.generate(ids[0], 8)["tokens"] == want.tolist()
    # GGUF out and back: the same codes, scales rounded to GGUF's fp16 block scales
    g = export_gguf(ck, tmp_path / "m.gguf", "tq2_0", head_dtype="f32")
    back = from_gguf(g)
    with torch.no_grad():
        a, b = back(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 0.01 * b.abs().max()
    assert back.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:] \
        .tolist() == want.tolist()
    # the zero-shot scorer's shared-context pass is exact on this architecture too
    reqs = [("The quick brown fox", " jumps over the dog"), ("The quick brown fox", " sleeps")]
    shared = LoglikScorer(model, tok).loglikelihood(reqs)
    plain = LoglikScorer(model, tok, share_context=False).loglikelihood(reqs)
    assert all(abs(a[0] - b[0]) < 1e-3 for a, b in zip(shared, plain))


def test_unknown_architectures_are_one_line():
    with pytest.raises(TernlmError, match="runs gpt2, llama, qwen2 models, not 'mistral'"):
        Arch.from_config({"model_type": "mistral"})
    with pytest.raises(TernlmError, match="the llama config has no 'hidden_size'"):
        Arch.from_config({"model_type": "llama", "num_hidden_layers": 2})
    with pytest.raises(TernlmError, match="sliding-window"):
        Arch.from_config({**tiny("qwen2").config.to_dict(), "use_sliding_window": True})


@pytest.mark.parametrize("model_type", ["qwen2"])
def test_llama_cpp_runs_the_new_row(model_type, tmp_path, gpt2_tokenizer):
    """llama.cpp reads the exported file of the row added last and continues a prompt as ternlm does."""
    import numpy as np

    from tests.conftest import require_peer
    from ternlm.conversion import convert
    from ternlm.config import TernaryConfig
    from ternlm.export.gguf import export_gguf, from_gguf

    llama_cpp = require_peer("llama_cpp")
    m = tiny(model_type)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(20)  # spread the logits: no near-ties between runtimes
    path = export_gguf(convert(m, TernaryConfig(act_bits=None)), tmp_path / "m.gguf", "tq2_0", head_dtype="f32",
                       tokenizer=gpt2_tokenizer)
    ours = from_gguf(path)
    ids = gpt2_tokenizer("The quick brown fox jumps over the lazy dog.").input_ids
    with torch.no_grad():
        greedy = ours.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                               pad_token_id=gpt2_tokenizer.eos_token_id)[0].tolist()
        mine = ours(torch.tensor([greedy[:-1]])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_threads=2, n_ctx=256, logits_all=True, verbose=False)
    try:
        llm.eval(greedy[:-1])
        theirs = np.array(llm.scores[: len(greedy) - 1], dtype=np.float32)
    finally:
        llm.close()
    err = np.abs(theirs - mine).max(-1) / np.abs(mine).max(-1)
    assert err.max() < 0.03
