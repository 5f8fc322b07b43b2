import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.nn.surgery import quantize_model
from ternlm.nn.verify import verify
from ternlm.train.classify import ClassifierTrainConfig, train_classifier
from ternlm.train.lm import LMTrainConfig, train_lm

TEXTS = ["win a free prize now call", "see you at lunch", "urgent claim your cash", "ok thanks mate"] * 8
LABELS = [1, 0, 1, 0] * 8


def _cls(tok):
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                                    pad_token_id=tok.pad_token_id))


def test_qat_with_lambda_warmup_ends_fully_ternary(gpt2_tokenizer):
    m = quantize_model(_cls(gpt2_tokenizer), TernaryConfig(lambda_warmup_steps=4))
    h = train_classifier(m, gpt2_tokenizer, TEXTS, LABELS, ClassifierTrainConfig(epochs=1, batch_size=8, lr=1e-3),
                         progress=False)
    assert h["quant_lambda"] == [0.0, 0.25, 0.5, 0.75]
    assert verify(m).ok  # warm-up is finished once training ends


def test_projection_recipe_keeps_latent_weights_ternary(gpt2_tokenizer):
    m = quantize_model(_cls(gpt2_tokenizer), TernaryConfig(project_after_step=True))
    train_classifier(m, gpt2_tokenizer, TEXTS, LABELS, ClassifierTrainConfig(epochs=1, batch_size=8, lr=1e-3),
                     progress=False)
    for name in m.ternlm_targets:
        w = m.get_submodule(name).weight
        assert len(w.abs().unique()) <= 2


def test_classifier_learns(gpt2_tokenizer):
    m = _cls(gpt2_tokenizer)
    h = train_classifier(m, gpt2_tokenizer, TEXTS, LABELS, ClassifierTrainConfig(epochs=6, batch_size=8, lr=3e-3),
                         progress=False)
    assert sum(h["loss"][-4:]) / 4 < sum(h["loss"][:4]) / 4


def test_nan_loss_is_a_clear_error(gpt2_tokenizer):
    m = _cls(gpt2_tokenizer)
    with torch.no_grad():
        m.score.weight.fill_(float("nan"))
    with pytest.raises(TernlmError, match="diverged"):
        train_classifier(m, gpt2_tokenizer, TEXTS, LABELS, ClassifierTrainConfig(epochs=1, batch_size=8),
                         progress=False)


def test_lm_training_reduces_loss():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=64))
    tokens = torch.arange(64).repeat(20)  # a perfectly predictable stream
    h = train_lm(m, tokens, LMTrainConfig(steps=30, batch_size=4, block_size=16, lr=1e-2, warmup_steps=3),
                 progress=False)
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    with pytest.raises(TernlmError):
        train_lm(m, tokens[:10], LMTrainConfig(steps=1, block_size=16), progress=False)
