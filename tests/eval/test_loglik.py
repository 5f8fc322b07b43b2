"""The log-likelihood scorer against hand-computed log-probabilities on tiny models."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ternlm.errors import TernlmError
from ternlm.eval.loglik import LoglikScorer, rolling_windows

REQUESTS = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " hat and the dog ran away"),
    ("The cat sat on the ", "mat"),  # trailing space moves to the continuation
    ("", "hello world"),  # empty context: the prefix token
    ("Question: what is red?\nAnswer:", " a rose"),
    ("Question: what is red?\nAnswer:", " blood"),
    ("Question: what is red?\nAnswer:", " the colour of a fire engine"),
    ("A", " b"),
]


def _llama():
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=50256, eos_token_id=50256)
    return LlamaForCausalLM(cfg)


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tiny_gpt2_config):
    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config) if request.param == "gpt2" else _llama()
    return m.eval()


def hand_loglik(model, tok, context, continuation):
    """The definition, spelled out: lm-eval's encoding, one plain forward, sum of log-softmax."""
    if context == "":
        ctx, cont = [tok.eos_token_id], tok(continuation, add_special_tokens=False).input_ids
    else:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        ctx = tok(context, add_special_tokens=False).input_ids
        cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    ll = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    greedy = all(int(logits[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    return ll, greedy


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("batch_tokens", [1, 64, 4096])
def test_scores_equal_hand_computed(model, gpt2_tokenizer, share, batch_tokens):
    s = LoglikScorer(model, gpt2_tokenizer, batch_tokens=batch_tokens, share_context=share)
    got = s.loglikelihood(REQUESTS)
    for (c, x), (ll, greedy) in zip(REQUESTS, got):
        want_ll, want_greedy = hand_loglik(model, gpt2_tokenizer, c, x)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
    assert s.stats.mode == ("shared" if share else "plain")
    if share:  # the shared context went through the model once, not once per continuation
        plain = LoglikScorer(model, gpt2_tokenizer, share_context=False)
        plain.loglikelihood(REQUESTS)
        assert s.stats.tokens < plain.stats.tokens


def test_greedy_continuation_is_greedy(model, gpt2_tokenizer):
    s = LoglikScorer(model, gpt2_tokenizer)
    ctx = gpt2_tokenizer("Once upon a time", add_special_tokens=False).input_ids
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(ctx):]
    other = [(greedy[0] + 1) % 50257] + greedy[1:]
    (ll_g, g), (ll_o, o) = s.loglikelihood_tokens([(ctx, greedy), (ctx, other)])
    assert g and not o
    assert ll_g > ll_o


def test_context_truncated_from_the_left(model, gpt2_tokenizer):
    """Inputs longer than max_length keep the last tokens of the context (lm-eval-harness's rule)."""
    s = LoglikScorer(model, gpt2_tokenizer, max_length=16)
    ctx, cont = list(range(100, 140)), [7, 8, 9]
    (ll, _), = s.loglikelihood_tokens([(ctx, cont)])
    kept = ctx[-(16 - len(cont) + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([kept + cont[:-1]])).logits[0].double(), -1)
    want = sum(logp[len(kept) - 1 + j, t].item() for j, t in enumerate(cont))
    assert ll == pytest.approx(want, abs=1e-4)
    with pytest.raises(TernlmError, match="longer than the model's 16-token context"):
        s.loglikelihood_tokens([(ctx, list(range(17)))])


def test_falls_back_when_the_shared_pass_differs(tiny_gpt2_config, gpt2_tokenizer):
    """A model that ignores position_ids gets the shared pass wrong: the probe notices, and every
    request is then scored on its own (and right)."""
    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config).eval()
    fwd = m.transformer.forward
    m.transformer.forward = lambda *a, position_ids=None, **k: fwd(*a, **k)
    s = LoglikScorer(m, gpt2_tokenizer)
    got = s.loglikelihood(REQUESTS)
    assert s.stats.mode == "plain" and "differ" in s.stats.notes[0]
    for (c, x), (ll, _) in zip(REQUESTS, got):
        assert ll == pytest.approx(hand_loglik(m, gpt2_tokenizer, c, x)[0], abs=1e-4)


def test_noise_from_the_input_length_alone_is_not_a_difference(tiny_gpt2_config, gpt2_tokenizer):
    """A model whose outputs move with the input's length (as W1.58A8 models do, through int8
    roundings of last-bit changes) keeps the shared pass when it differs from the plain pass by no
    more than the plain pass differs from itself at other lengths; the note says by how much."""
    torch.manual_seed(0)
    m = GPT2LMHeadModel(tiny_gpt2_config).eval()
    fwd = m.transformer.forward

    def noisy(*a, **k):
        out = fwd(*a, **k)
        T, C = out[0].shape[1], out[0].shape[2]
        out.last_hidden_state = out[0] + 0.02 * torch.sin(torch.arange(C) * (T % 5 + 1.0))
        return out

    m.transformer.forward = noisy
    s = LoglikScorer(m, gpt2_tokenizer)
    s.loglikelihood(REQUESTS)
    assert s.stats.mode == "shared"
    assert any("within the plain pass's own" in n for n in s.stats.notes)


def test_non_finite_logits_are_an_error(model, gpt2_tokenizer):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(TernlmError, match="non-finite"):
        LoglikScorer(model, gpt2_tokenizer, share_context=False).loglikelihood(REQUESTS[:1])


@pytest.mark.parametrize("n, max_length", [(1, 8), (7, 8), (8, 8), (9, 8), (30, 8), (100, 16)])
def test_rolling_windows_score_each_token_once(n, max_length):
    tokens = list(range(1000, 1000 + n))
    windows = rolling_windows(tokens, 0, max_length)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= max_length  # what the model reads
        assert len(ctx) >= 1
    assert windows[0][0] == [0]
    for (ctx, cont), (_, prev) in zip(windows[1:], windows):  # later contexts end where the window starts
        assert ctx[-1] == prev[-1]


def test_loglikelihood_rolling_equals_the_sum_over_tokens(model, gpt2_tokenizer):
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 3
    s = LoglikScorer(model, gpt2_tokenizer)
    (got,) = s.loglikelihood_rolling([text])
    ids = [gpt2_tokenizer.eos_token_id] + gpt2_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) <= 128
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    want = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert got == pytest.approx(want, abs=1e-3)
    assert math.isfinite(got)


def test_bad_requests(model, gpt2_tokenizer):
    s = LoglikScorer(model, gpt2_tokenizer)
    with pytest.raises(TernlmError, match="no tokens"):
        s.loglikelihood_tokens([([1, 2], [])])
    with pytest.raises(TernlmError, match="batch_tokens"):
        LoglikScorer(model, gpt2_tokenizer, batch_tokens=0)
    assert s.loglikelihood([]) == []
