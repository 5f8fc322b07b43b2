import json

import numpy as np
import pytest
import torch
from transformers import GPT2ForSequenceClassification

from ternlm.errors import TernlmError
from ternlm.eval.classification import classification_metrics, evaluate_classifier, predict

TEXTS = [
    "WINNER!! You have won a free prize, call now to claim",
    "ok see you later",
    "Are we still meeting for lunch tomorrow at the usual place?",
    "hi",
    "URGENT your mobile number has been selected for a cash award of 2000 pounds",
]


@pytest.fixture
def classifier(tiny_gpt2_config):
    tiny_gpt2_config.num_labels = 2
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(tiny_gpt2_config)


def test_metrics_perfect():
    m = classification_metrics([0, 1, 1, 0], [0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2])
    assert m == {
        "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "roc_auc": 1.0,
        "confusion_matrix": [[2, 0], [0, 2]], "n": 4, "n_pos": 2, "n_neg": 2,
    }


def test_metrics_all_wrong():
    m = classification_metrics([0, 1, 1, 0], [1, 0, 0, 1], [0.9, 0.1, 0.2, 0.8])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["roc_auc"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert m["confusion_matrix"] == [[0, 2], [2, 0]]


def test_metrics_one_class_has_no_auc_and_zero_division_is_zero():
    m = classification_metrics([0, 0, 0], [0, 1, 0], [0.1, 0.7, 0.2])
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)  # tp = 0, and no positives
    assert m["confusion_matrix"] == [[2, 1], [0, 0]]
    assert (m["n"], m["n_pos"], m["n_neg"]) == (3, 0, 3)


def test_metrics_mixed_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 0, 1, 0, 1, 0, 0, 1]  # tp=3 fn=1 fp=1 tn=3
    s = [0.9, 0.4, 0.8, 0.1, 0.6, 0.2, 0.3, 0.7]  # 15 of 16 (pos, neg) pairs ranked right
    m = classification_metrics(y, p, s)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 0.75
    assert m["roc_auc"] == pytest.approx(15 / 16)
    assert classification_metrics(y, p)["roc_auc"] is None


def test_metrics_are_plain_json_types():
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0.2, 0.9, 0.4], dtype=np.float32))
    json.dumps(m)
    assert all(type(m[k]) is float for k in ("accuracy", "precision", "recall", "f1", "roc_auc"))
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert all(type(m[k]) is int for k in ("n", "n_pos", "n_neg"))


@pytest.mark.parametrize("y_true, y_pred", [([0, 2], [0, 1]), ([0, 1], [0, 1, 1]), ([], [])])
def test_metrics_reject_bad_input(y_true, y_pred):
    with pytest.raises(TernlmError):
        classification_metrics(y_true, y_pred)


def test_predict_shapes_and_probabilities(classifier, gpt2_tokenizer):
    preds, prob = predict(classifier, gpt2_tokenizer, TEXTS, batch_size=2)
    assert preds.shape == prob.shape == (len(TEXTS),)
    assert preds.dtype == np.int64 and prob.dtype == np.float64
    assert ((prob >= 0) & (prob <= 1)).all()
    np.testing.assert_array_equal(preds, (prob > 0.5).astype(np.int64))


def test_predict_padding_does_not_change_results(classifier, gpt2_tokenizer):
    # Batched rows are right-padded to the longest text; each must match its unpadded run.
    _, batched = predict(classifier, gpt2_tokenizer, TEXTS, batch_size=len(TEXTS))
    _, single = predict(classifier, gpt2_tokenizer, TEXTS, batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_predict_truncates_beyond_model_context(classifier, gpt2_tokenizer):
    long = "free prize " * 400  # far more tokens than n_positions = 128
    preds, _ = predict(classifier, gpt2_tokenizer, [long, "hi"], max_length=64)
    assert preds.shape == (2,)


def test_predict_restores_train_mode(classifier, gpt2_tokenizer):
    classifier.train()
    predict(classifier, gpt2_tokenizer, TEXTS[:2])
    assert classifier.training and all(m.training for m in classifier.modules())


def test_predict_rejects_pad_mismatch(classifier, gpt2_tokenizer):
    classifier.config.pad_token_id = None
    with pytest.raises(TernlmError, match="pad_token_id"):
        predict(classifier, gpt2_tokenizer, TEXTS, batch_size=2)


def test_evaluate_classifier(classifier, gpt2_tokenizer):
    labels = [1, 0, 0, 0, 1]
    m = evaluate_classifier(classifier, gpt2_tokenizer, TEXTS, labels, batch_size=4)
    assert m["n"] == 5 and m["n_pos"] == 2
    assert sum(map(sum, m["confusion_matrix"])) == 5
    assert m["roc_auc"] is not None and 0 <= m["roc_auc"] <= 1


def test_evaluate_classifier_nan_logits(classifier, gpt2_tokenizer):
    with torch.no_grad():
        classifier.score.weight.fill_(float("nan"))
    with pytest.raises(TernlmError, match="NaN logits"):
        evaluate_classifier(classifier, gpt2_tokenizer, TEXTS, [1, 0, 0, 0, 1])


def test_evaluate_classifier_length_mismatch(classifier, gpt2_tokenizer):
    with pytest.raises(TernlmError, match="labels"):
        evaluate_classifier(classifier, gpt2_tokenizer, TEXTS, [0, 1])


def test_predict_length_sorted_batches_keep_the_input_order(classifier, gpt2_tokenizer):
    # Batches are formed longest-first; results must still come back in the caller's order.
    texts = ["hi", "free prize " * 12, "call now", "ok", "win cash today " * 5, "see you at 5"]
    preds3, prob3 = predict(classifier, gpt2_tokenizer, texts, batch_size=3)
    for i, t in enumerate(texts):
        p1, q1 = predict(classifier, gpt2_tokenizer, [t], batch_size=1)
        assert preds3[i] == p1[0]
        assert abs(prob3[i] - q1[0]) < 1e-5
