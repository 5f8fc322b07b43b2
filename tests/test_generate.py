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
