"""Sequence-classification evaluation: batched prediction and binary metrics (spam = 1).

Also home of the two small helpers every evaluator uses: ``eval_mode`` (dropout off for the
duration, the caller's train/eval flags restored after) and ``model_device``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ternlm.errors import TernlmError


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag.

    A model built from a config starts in train mode; evaluating it with dropout on would give
    noisy, non-reproducible numbers. Flags are restored per module because a caller may have
    frozen parts of a model in eval mode on purpose.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (packed modules may hold only buffers)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def encode_batch(tokenizer, texts, max_length: int, device):
    """Right-padded, truncated input tensors for a batch of messages, on ``device``."""
    return tokenizer(list(texts), padding=True, padding_side="right", truncation=True, max_length=max_length,
                     return_tensors="pt").to(device)


def _check_pad(model: torch.nn.Module, tokenizer, batch_size: int) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        raise TernlmError("tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    # HF sequence classifiers pool the last token that is not config.pad_token_id; a mismatch
    # with the tokenizer's pad would pool a padding position and silently corrupt predictions.
    config = getattr(model, "config", None)
    model_pad = getattr(config, "pad_token_id", None)
    if config is not None and batch_size > 1 and model_pad != pad:
        raise TernlmError(
            f"model.config.pad_token_id ({model_pad}) != tokenizer.pad_token_id ({pad}); "
            "set model.config.pad_token_id = tokenizer.pad_token_id"
        )
    return pad


def predict(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Classify ``texts`` with a binary HF sequence classifier.

    Returns ``(preds, spam_prob)``: argmax labels (int64) and the softmax probability of label 1
    (float64), one per text. Texts are truncated to ``max_length`` tokens and right-padded: GPT-2's
    absolute positions then start at 0 for every row, and HF pools the last non-pad token.
    Raises ``TernlmError`` if the model produces NaN/inf logits (a broken quantization).
    """
    if batch_size < 1:
        raise TernlmError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    _check_pad(model, tokenizer, batch_size)
    device = model_device(model)
    # Batches of similar length (longest first): padding costs compute, and SMS lengths vary 10x.
    # Right padding and causal attention make each row's logits independent of its batch mates.
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]  # once; padded per batch
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    spam_prob = np.zeros(len(texts), dtype=np.float64)
    pred = np.zeros(len(texts), dtype=np.int64)
    starts = range(0, len(texts), batch_size)
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(starts, desc="predict", disable=not progress):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, padding_side="right",
                                  return_tensors="pt").to(device)
            logits = model(**batch).logits.float()  # (B, num_labels)
            if logits.shape[-1] != 2:
                raise TernlmError(f"expected a binary classifier (2 logits), got {logits.shape[-1]}")
            if not torch.isfinite(logits).all():
                bad = sorted(idx[j] for j in (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist())
                raise TernlmError(f"model produced NaN logits (or inf) for text(s) {bad[:5]}; "
                                  "the model is numerically broken")
            p = logits.softmax(-1).cpu()
            pred[idx] = p.argmax(-1).numpy()
            spam_prob[idx] = p[:, 1].double().numpy()
    return pred, spam_prob


def classification_metrics(y_true, y_pred, y_score=None) -> dict:
    """Binary metrics with spam (label 1) as the positive class, as plain JSON-ready numbers.

    Keys: accuracy, precision, recall, f1 (0.0 where undefined), roc_auc (None when y_true has a
    single class or no scores are given), confusion_matrix ``[[tn, fp], [fn, tp]]``, and the
    support counts n, n_pos, n_neg.
    """
    # scikit-learn (and SciPy under it) cost ~150 MB of RSS and a second to import: only when scoring
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise TernlmError(
            f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}"
        )
    if len(y_true) == 0:
        raise TernlmError("no examples to score")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.isin(y, (0, 1)).all():
            raise TernlmError(f"{name} must contain only labels 0 and 1")
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="binary", pos_label=1, zero_division=0
    )
    roc_auc = None
    if y_score is not None and len(np.unique(y_true)) == 2:
        roc_auc = float(roc_auc_score(y_true, np.asarray(y_score, dtype=np.float64)))
    cm = confusion_matrix(y_true, y_pred, labels=[0, 1])
    n_pos = int((y_true == 1).sum())
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": roc_auc,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "n": int(len(y_true)),
        "n_pos": n_pos,
        "n_neg": int(len(y_true)) - n_pos,
    }


def evaluate_classifier(model: torch.nn.Module, tokenizer, texts: Sequence[str], labels, **kw) -> dict:
    """``predict`` then ``classification_metrics``; ``kw`` goes to ``predict``."""
    texts = list(texts)
    labels = np.asarray(labels)
    if len(texts) != len(labels):
        raise TernlmError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise TernlmError("no texts to evaluate")
    preds, spam_prob = predict(model, tokenizer, texts, **kw)
    return classification_metrics(labels, preds, spam_prob)
