import io

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ternlm.errors import TernlmError
from ternlm.generate import GenerateConfig, generate


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=48)).eval()


def test_greedy_matches_hf_and_streams(lm, gpt2_tokenizer):
    buf = io.StringIO()
    res = generate(lm, gpt2_tokenizer, "The city of", GenerateConfig(max_new_tokens=8), stream=buf)
    enc = gpt2_tokenizer("The city of", return_tensors="pt")
    ref = lm.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
    assert res["text"] == gpt2_tokenizer.decode(ref[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert buf.getvalue().strip() == res["text"].strip()
    assert res["n_new_tokens"] == 8 and res["decode_tok_s"] > 0


def test_sampling_is_seeded(lm, gpt2_tokenizer):
    def sample(seed):
        cfg = GenerateConfig(max_new_tokens=12, temperature=2.0, top_k=0, top_p=1.0, seed=seed)
        return generate(lm, gpt2_tokenizer, "Hello", cfg)["text"]

    texts = {seed: sample(seed) for seed in range(4)}
    assert sample(3) == texts[3]  # the seed decides the sample
    assert len(set(texts.values())) > 1  # and it really samples: other seeds, other texts
    assert generate(lm, gpt2_tokenizer, "Hello", GenerateConfig(max_new_tokens=12))["text"] not in texts.values()


def test_context_overflow_and_bad_config(lm, gpt2_tokenizer):
    with pytest.raises(TernlmError, match="context"):
        generate(lm, gpt2_tokenizer, "word " * 40, GenerateConfig(max_new_tokens=20))
    with pytest.raises(TernlmError):
        GenerateConfig(top_p=0)


def test_engine_choice_covers_gpt2_and_llama_and_falls_back_in_one_line(lm):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from ternlm.generate import _pick_engine

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).eval()
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=64)).eval()
    assert _pick_engine(lm, GenerateConfig()) == "fast"
    assert _pick_engine(llama, GenerateConfig()) == "fast"
    assert _pick_engine(llama, GenerateConfig(engine="hf")) == "hf"
    log = io.StringIO()
    assert _pick_engine(neox, GenerateConfig(), log=log) == "hf"
    assert log.getvalue().count("\n") == 1 and "Hugging Face generate" in log.getvalue()
    with pytest.raises(TernlmError, match="--engine hf"):
        _pick_engine(neox, GenerateConfig(engine="fast"))


def test_generate_classifies_the_model_once_and_reads_its_config_once(tmp_path, gpt2_tokenizer, monkeypatch):
    """The user's path: `ternlm generate` on a checkpoint decides what the model is once and reads
    config.json once (the engine is built from that one read), however many pieces need it."""
    import io
    import pathlib

    from transformers import GPT2Config, GPT2LMHeadModel

    from ternlm.checkpoint import save_pretrained
    from ternlm.conversion import convert
    from ternlm.generate import GenerateConfig, main_generate
    import ternlm.models.loading as loading

    torch.manual_seed(0)
    ck = save_pretrained(convert(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=64))),
                         gpt2_tokenizer, tmp_path / "ck")
    reads, kinds = [], []
    real_read_text, real_kind = pathlib.Path.read_text, loading.source_kind
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda self, *a, **k: (reads.append(self.name), real_read_text(self, *a, **k))[1])
    monkeypatch.setattr(loading, "source_kind", lambda *a, **k: (kinds.append(a), real_kind(*a, **k))[1])
    res = main_generate(str(ck), "Hello there", GenerateConfig(max_new_tokens=4), out=io.StringIO())
    assert res["n_new_tokens"] == 4
    assert reads.count("config.json") == 1 and len(kinds) == 1, (reads, kinds)
