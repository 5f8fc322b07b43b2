import random
import re

import pytest
import torch
from transformers import GPT2ForSequenceClassification

from ternlm.errors import TernlmError
from ternlm.eval.classification import evaluate_classifier
from ternlm.eval.robustness import PERTURBATIONS, perturb, robustness_eval

TEXTS = [
    "Hello, how are you doing today? I'll call you later.",
    "WINNER!! You have been selected to receive a free prize. Reply now.",
    "ok",
    "Go until jurong point, crazy.. Available only in bugis n great world la e buffet...",
    "Sorry, I'll call later",
    "Did you catch the bus ? Are you frying an egg ? Did you make a tea?",
]
LABELS = [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_deterministic_for_a_seed(kind):
    assert perturb(TEXTS, kind, seed=3) == perturb(TEXTS, kind, seed=3)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_changes_every_text_and_keeps_length(kind):
    out = perturb(TEXTS, kind)
    assert len(out) == len(TEXTS)
    assert all(o != t for o, t in zip(out, TEXTS))


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_differs_across_seeds(kind):
    assert perturb(TEXTS, kind, seed=0) != perturb(TEXTS, kind, seed=1)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_blank_texts_unchanged(kind):
    assert perturb(["", "  "], kind) == ["", "  "]


def test_does_not_touch_global_random_state():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    perturb(TEXTS, "typos")
    assert random.random() == expected


def test_typos_at_rate_one_change_every_word():
    text = "please call me back when you get this message"
    out = perturb([text], "typos", rate=1.0)[0]
    assert all(a != b for a, b in zip(out.split(" "), text.split(" ")))
    assert len(out.split(" ")) == len(text.split(" "))


def test_case_only_changes_case():
    for t, o in zip(TEXTS, perturb(TEXTS, "case")):
        assert o.lower() == t.lower()


def test_whitespace_punct_only_adds_whitespace_and_punctuation():
    def strip(s):
        return re.sub(r"[\s!?.]+", "", s)

    for t, o in zip(TEXTS, perturb(TEXTS, "whitespace_punct")):
        assert strip(o) == strip(t) and len(o) > len(t)


def test_url_inserts_one_url_at_a_word_boundary():
    url = re.compile(r"(https?://)?(www\.)?[a-z]+\.(com|co\.uk|net|biz|info|org)(/\w+)?")
    for t, o in zip(TEXTS, perturb(TEXTS, "url")):
        parts = o.split(" ")
        inserted = [i for i, p in enumerate(parts) if url.fullmatch(p)]
        assert len(inserted) == 1
        del parts[inserted[0]]
        assert " ".join(parts) == t


def test_number_inserts_digits():
    for t, o in zip(TEXTS, perturb(TEXTS, "number")):
        assert sum(c.isdigit() for c in o) > sum(c.isdigit() for c in t)


@pytest.mark.parametrize("kw, match", [
    (dict(kind="leet"), "unknown perturbation"),
    (dict(kind="typos", rate=0.0), "rate"),
    (dict(kind="typos", rate=1.5), "rate"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(TernlmError, match=match):
        perturb(TEXTS, **kw)


def test_rejects_single_string():
    with pytest.raises(TernlmError, match="list"):
        perturb("hello there", "typos")


def test_robustness_eval_structure_and_delta():
    calls = []

    def evaluate_fn(texts, labels):
        calls.append(list(texts))
        return {"f1": 1.0 if list(texts) == TEXTS else 0.25, "accuracy": 0.5}

    r = robustness_eval(evaluate_fn, TEXTS, LABELS, kinds=("typos", "url"), seed=1)
    assert list(r) == ["clean", "typos", "url"]
    assert r["clean"]["delta_f1"] == 0.0
    assert r["typos"]["delta_f1"] == r["url"]["delta_f1"] == -0.75
    assert calls[1] == perturb(TEXTS, "typos", seed=1)


def test_robustness_eval_checks_kinds_before_evaluating():
    def evaluate_fn(texts, labels):
        raise AssertionError("should not be called")

    with pytest.raises(TernlmError, match="unknown perturbation"):
        robustness_eval(evaluate_fn, TEXTS, LABELS, kinds=("typos", "leet"))


def test_robustness_eval_with_classifier(tiny_gpt2_config, gpt2_tokenizer):
    tiny_gpt2_config.num_labels = 2
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_gpt2_config)
    r = robustness_eval(
        lambda t, y: evaluate_classifier(model, gpt2_tokenizer, t, y, batch_size=8), TEXTS, LABELS, kinds=("case",)
    )
    assert set(r) == {"clean", "case"}
    assert r["case"]["delta_f1"] == pytest.approx(r["case"]["f1"] - r["clean"]["f1"])
