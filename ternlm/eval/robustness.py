"""Seeded text perturbations and the metric drop they cause.

Each perturbation mimics something real SMS traffic contains (typos, shouting, spacing and
punctuation noise, links, phone numbers). ``url`` and ``number`` insert tokens that are strong
surface cues for spam, so applying them to ham probes whether a classifier relies on those cues
rather than on the message.

Every call draws from its own ``random.Random(seed)``: the same (texts, kind, seed, rate) gives
the same output, and the global ``random`` state is untouched.
"""

from __future__ import annotations

import random
import re
import string
from typing import Callable, Sequence

from ternlm.errors import TernlmError

PERTURBATIONS = ("typos", "case", "whitespace_punct", "url", "number")

_SPLIT_WS = re.compile(r"(\s+)")  # capturing: words at even indices, separators at odd
_WORD = re.compile(r"\S+")
_PUNCT_RUN = re.compile(r"([!?.])\1*(?=\s|$)")  # sentence punctuation only, not "1.5" or URLs
_URL_WORDS = ("win", "prize", "claim", "free", "offer", "mobile", "txt", "bonus", "deal", "info",
              "get", "ringtone", "music", "photo", "club", "my", "now", "gift")
_TLDS = (".com", ".co.uk", ".net", ".biz", ".info", ".org")


def _title(word: str) -> str:
    # str.title() would give "I'Ll"; only the word's first character is raised.
    return word[:1].upper() + word[1:].lower()


def _n_chosen(n: int, rate: float) -> int:
    # At least one edit, so every eligible message is perturbed; short SMS would otherwise
    # mostly pass through unchanged at small rates.
    return min(n, max(1, round(rate * n)))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _typo_word(word: str, rng: random.Random) -> str:
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    i = rng.choice(letters)
    op = rng.choice(("swap", "drop", "duplicate", "replace"))
    if op == "swap":
        neighbours = [
            j for j in (i + 1, i - 1) if 0 <= j < len(word) and word[j].isalpha() and word[j] != word[i]
        ]
        if neighbours:
            a, b = sorted((i, neighbours[0]))
            return word[:a] + word[b] + word[a] + word[b + 1 :]
        op = "duplicate"  # "ll", "a": nothing to swap with
    if op == "drop" and len(letters) > 1:  # dropping a one-letter word would delete it
        return word[:i] + word[i + 1 :]
    if op in ("drop", "duplicate"):
        return word[:i] + word[i] + word[i:]
    c = rng.choice([x for x in string.ascii_lowercase if x != word[i].lower()])
    return word[:i] + (c.upper() if word[i].isupper() else c) + word[i + 1 :]


def _typos(text: str, rng: random.Random, rate: float) -> str:
    parts = _SPLIT_WS.split(text)
    eligible = [i for i in range(0, len(parts), 2) if any(c.isalpha() for c in parts[i])]
    if not eligible:
        return text
    for i in rng.sample(eligible, _n_chosen(len(eligible), rate)):
        parts[i] = _typo_word(parts[i], rng)
    return "".join(parts)


def _case(text: str, rng: random.Random, rate: float) -> str:
    modes = ["upper", "lower", "title", "words"]
    rng.shuffle(modes)
    for mode in modes:  # first mode that changes the text; all-caps "OK" cannot be upper-cased
        if mode == "upper":
            new = text.upper()
        elif mode == "lower":
            new = text.lower()
        elif mode == "title":
            new = _WORD.sub(lambda m: _title(m.group(0)), text)
        else:
            parts = _SPLIT_WS.split(text)
            words = [i for i in range(0, len(parts), 2) if parts[i]]
            for i in rng.sample(words, _n_chosen(len(words), rate)):
                parts[i] = rng.choice((str.upper, str.lower, _title, str.swapcase))(parts[i])
            new = "".join(parts)
        if new != text:
            return new
    return text


def _whitespace_punct(text: str, rng: random.Random, rate: float) -> str:
    parts = _SPLIT_WS.split(text)
    separators = list(range(1, len(parts), 2))
    if separators:
        for i in rng.sample(separators, _n_chosen(len(separators), rate)):
            parts[i] += rng.choice((" ", "  ", "\n", "\n\n"))
    new = _PUNCT_RUN.sub(lambda m: m.group(1) * 3 if rng.random() < 0.5 else m.group(0), "".join(parts))
    body = new.rstrip()
    if new == text or (not body.endswith(("!", "?", ".")) and rng.random() < 0.5):
        new = body + rng.choice(("!!!", "...", "!!", "?!?")) + new[len(body) :]
    return new


def _insert_token(text: str, token: str, rng: random.Random) -> str:
    parts = text.split(" ")
    parts.insert(rng.randint(0, len(parts)), token)
    return " ".join(parts)


def _url(text: str, rng: random.Random, rate: float) -> str:
    scheme = rng.choice(("http://", "https://", "www.", "http://www.", ""))
    host = rng.choice(_URL_WORDS) + rng.choice(_URL_WORDS) + rng.choice(_TLDS)
    slug = "".join(rng.choices(string.ascii_lowercase + string.digits, k=5))
    path = rng.choice(("", "/" + rng.choice(_URL_WORDS), "/" + slug))
    return _insert_token(text, scheme + host + path, rng)


def _number(text: str, rng: random.Random, rate: float) -> str:
    # UK formats: the SMS Spam Collection is mostly UK traffic.
    token = rng.choice((
        lambda: "07" + _digits(rng, 9),  # mobile
        lambda: "0800 " + _digits(rng, 3) + " " + _digits(rng, 4),  # freephone
        lambda: "+44 7" + _digits(rng, 3) + " " + _digits(rng, 6),
        lambda: str(rng.randint(60000, 89999)),  # premium short code
        lambda: "£" + str(rng.choice((100, 150, 250, 500, 1000, 2000))),
        lambda: str(rng.randint(1, 9999)),
    ))()
    return _insert_token(text, token, rng)


_FNS: dict[str, Callable[[str, random.Random, float], str]] = {
    "typos": _typos,
    "case": _case,
    "whitespace_punct": _whitespace_punct,
    "url": _url,
    "number": _number,
}


def _check_kind(kind: str) -> None:
    if kind not in _FNS:
        raise TernlmError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")


def perturb(texts: Sequence[str], kind: str, *, seed: int = 0, rate: float = 0.1) -> list[str]:
    """Perturb every text with ``kind`` (one of ``PERTURBATIONS``); same length and order.

    - typos: in ~``rate`` of the words (at least one), swap, drop, duplicate or replace a letter.
    - case: the whole message upper/lower/title-cased, or ~``rate`` of the words re-cased.
    - whitespace_punct: extra spaces/newlines after ~``rate`` of the word gaps, sentence
      punctuation sometimes tripled ("!!!", "..."), sometimes emphasis punctuation appended.
    - url: one plausible URL inserted at a random word boundary (``rate`` unused).
    - number: one phone-number-like or other number token inserted likewise (``rate`` unused).

    Every non-blank text is changed, except by typos when it has no letter; blank texts are
    returned as they are.
    """
    _check_kind(kind)
    if isinstance(texts, str):
        raise TernlmError("perturb expects a list of texts, got a single string")
    if not 0 < rate <= 1:
        raise TernlmError(f"rate must be in (0, 1], got {rate}")
    rng = random.Random(seed)
    fn = _FNS[kind]
    return [fn(t, rng, rate) if t.strip() else t for t in texts]


def robustness_eval(
    evaluate_fn: Callable[[list[str], Sequence[int]], dict],
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    kinds: Sequence[str] = PERTURBATIONS,
    seed: int = 0,
    rate: float = 0.1,
) -> dict[str, dict]:
    """Metrics on clean and on each perturbed copy of ``texts``.

    ``evaluate_fn(texts, labels)`` returns a metrics dict with an ``f1`` key (for example
    ``lambda t, y: evaluate_classifier(model, tok, t, y)``). Returns ``{"clean": metrics,
    kind: metrics | {"delta_f1": f1_kind - f1_clean}, ...}``; clean carries ``delta_f1 = 0.0``.
    """
    kinds = list(kinds)
    for kind in kinds:  # fail before spending time on the clean evaluation
        _check_kind(kind)
    texts = list(texts)
    clean = dict(evaluate_fn(texts, labels))
    clean["delta_f1"] = 0.0
    results = {"clean": clean}
    for kind in kinds:
        metrics = dict(evaluate_fn(perturb(texts, kind, seed=seed, rate=rate), labels))
        metrics["delta_f1"] = metrics["f1"] - clean["f1"]
        results[kind] = metrics
    return results
