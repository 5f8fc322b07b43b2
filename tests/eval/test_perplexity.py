import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from ternlm.errors import TernlmError
from ternlm.eval.perplexity import _windows, perplexity

TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its "
    "construction, the Eiffel Tower surpassed the Washington Monument to become the tallest man-made "
    "structure in the world, a title it held for 41 years until the Chrysler Building in New York "
    "City was finished in 1930. "
) * 2


@pytest.fixture
def lm(tiny_gpt2_config):  # n_positions = 128
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config)


@pytest.fixture
def seq_len(gpt2_tokenizer):
    n = len(gpt2_tokenizer(TEXT).input_ids)
    assert n > 128  # more than one window at every max_length used here
    return n


def _hf_guide_windows(seq_len, max_length, stride):
    # The loop from https://huggingface.co/docs/transformers/perplexity, transcribed.
    out, prev_end_loc = [], 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        out.append((begin_loc, end_loc, trg_len))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return out


@pytest.mark.parametrize("seq_len, max_length, stride", [(10, 4, 2), (10, 4, 4), (9, 4, 3), (3, 8, 8), (300, 128, 64)])
def test_windows_match_hf_guide_and_cover_each_token_once(seq_len, max_length, stride):
    windows = _windows(seq_len, max_length, stride)
    assert windows == _hf_guide_windows(seq_len, max_length, stride)
    targets = [t for begin, end, n in windows for t in range(end - n, end)]
    assert targets == list(range(seq_len))


def test_random_model_perplexity_is_about_vocab_size(lm, gpt2_tokenizer):
    # Random init with std 0.02 gives near-uniform next-token distributions.
    r = perplexity(lm, gpt2_tokenizer, TEXT, max_length=128, stride=128)
    assert math.isfinite(r["perplexity"])
    assert 0.5 * 50257 < r["perplexity"] < 2 * 50257
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))


def test_overlapping_windows_score_every_token_but_the_first(lm, gpt2_tokenizer, seq_len):
    r = perplexity(lm, gpt2_tokenizer, TEXT, max_length=128, stride=64)
    assert r["n_tokens"] == seq_len - 1
    assert r["n_windows"] == len(_windows(seq_len, 128, 64))
    assert (r["max_length"], r["stride"]) == (128, 64)


def test_disjoint_windows_match_hf_loss(lm, gpt2_tokenizer, seq_len):
    # With stride == max_length each window's first token has no context and is not scored,
    # and the guide's weighting (window loss x (len - 1)) is exact, so it can be recomputed here.
    r = perplexity(lm, gpt2_tokenizer, TEXT, max_length=128, stride=128)
    n_windows = math.ceil(seq_len / 128)
    assert (r["n_windows"], r["n_tokens"]) == (n_windows, seq_len - n_windows)
    ids = gpt2_tokenizer(TEXT, return_tensors="pt").input_ids
    lm.eval()
    with torch.no_grad():
        nll_sum = sum(
            lm(w, labels=w).loss.item() * (w.shape[1] - 1) for w in ids.split(128, dim=1)
        )
    assert r["nll"] == pytest.approx(nll_sum / (seq_len - n_windows), rel=1e-5)


@pytest.mark.parametrize("stride", [64, 128])
def test_batching_windows_does_not_change_result(lm, gpt2_tokenizer, stride):
    one = perplexity(lm, gpt2_tokenizer, TEXT, max_length=128, stride=stride, batch_size=1)
    three = perplexity(lm, gpt2_tokenizer, TEXT, max_length=128, stride=stride, batch_size=3)
    assert three["n_tokens"] == one["n_tokens"]
    assert three["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_max_length_capped_at_model_context(lm, gpt2_tokenizer):
    r = perplexity(lm, gpt2_tokenizer, TEXT, max_length=1024, stride=512, max_windows=1)
    assert (r["max_length"], r["stride"]) == (128, 128)
    assert (r["n_windows"], r["n_tokens"]) == (1, 127)


def test_max_windows(lm, gpt2_tokenizer):
    r = perplexity(lm, gpt2_tokenizer, TEXT, max_length=64, stride=32, max_windows=2)
    assert (r["n_windows"], r["n_tokens"]) == (2, 63 + 32)


@pytest.mark.parametrize("text", ["", "Hello"])
def test_too_short_text(lm, gpt2_tokenizer, text):
    with pytest.raises(TernlmError, match="too short"):
        perplexity(lm, gpt2_tokenizer, text)


def test_two_tokens_is_enough(lm, gpt2_tokenizer):
    r = perplexity(lm, gpt2_tokenizer, "Hello world")
    assert (r["n_windows"], r["n_tokens"]) == (1, 1)


def test_nan_model(lm, gpt2_tokenizer):
    with torch.no_grad():
        lm.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(TernlmError, match="non-finite"):
        perplexity(lm, gpt2_tokenizer, TEXT)


@pytest.mark.data
def test_wikitext_excerpt(lm, gpt2_tokenizer, wikitext_path):
    text = wikitext_path.read_text(encoding="utf-8")[:1500]
    r = perplexity(lm, gpt2_tokenizer, text, max_length=128, stride=64, batch_size=4)
    assert r["n_tokens"] == len(gpt2_tokenizer(text, verbose=False).input_ids) - 1
    assert math.isfinite(r["perplexity"])
