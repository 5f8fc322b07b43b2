import pytest
import torch
from transformers import GPT2LMHeadModel

from ternlm.errors import TernlmError
from ternlm.eval.generation import generate_samples

PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture
def lm(tiny_gpt2_config):  # n_positions = 128
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config)


def test_greedy_is_deterministic(lm, gpt2_tokenizer):
    a = generate_samples(lm, gpt2_tokenizer, PROMPTS, max_new_tokens=5)
    b = generate_samples(lm, gpt2_tokenizer, PROMPTS, max_new_tokens=5, seed=123)
    assert a == b
    assert [s["prompt"] for s in a] == PROMPTS
    assert all(isinstance(s["completion"], str) and s["completion"] for s in a)


def test_sampling_is_deterministic_per_seed(lm, gpt2_tokenizer):
    kw = dict(max_new_tokens=5, do_sample=True, temperature=1.0, top_k=50, top_p=0.95)
    a = generate_samples(lm, gpt2_tokenizer, PROMPTS, seed=1, **kw)
    assert generate_samples(lm, gpt2_tokenizer, PROMPTS, seed=1, **kw) == a
    assert generate_samples(lm, gpt2_tokenizer, PROMPTS, seed=2, **kw) != a


def test_completion_does_not_depend_on_other_prompts(lm, gpt2_tokenizer):
    kw = dict(max_new_tokens=5, do_sample=True, seed=3)
    both = generate_samples(lm, gpt2_tokenizer, PROMPTS, **kw)
    alone = generate_samples(lm, gpt2_tokenizer, PROMPTS[1:], **kw)
    assert both[1] == alone[0]


def test_global_rng_and_train_mode_are_restored(lm, gpt2_tokenizer):
    lm.train()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    generate_samples(lm, gpt2_tokenizer, PROMPTS[:1], max_new_tokens=4, do_sample=True, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert lm.training


def test_prompt_longer_than_context(lm, gpt2_tokenizer):
    with pytest.raises(TernlmError, match="context"):
        generate_samples(lm, gpt2_tokenizer, ["word " * 120], max_new_tokens=40)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0)])
def test_bad_arguments(lm, gpt2_tokenizer, kw):
    with pytest.raises(TernlmError):
        generate_samples(lm, gpt2_tokenizer, PROMPTS, **kw)


def test_empty_prompt(lm, gpt2_tokenizer):
    with pytest.raises(TernlmError, match="empty prompt"):
        generate_samples(lm, gpt2_tokenizer, [""])
