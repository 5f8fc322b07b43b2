import pytest

from tests.conftest import require_data
from ternlm.data.text import load_text, looks_like_hub_id
from ternlm.errors import TernlmError


def test_wikitext_file(wikitext_path):
    text = load_text(str(wikitext_path))
    assert len(text) > 1_000_000
    assert text.lstrip().startswith("= Robert Boulter =")


def test_wikitext_directory_picks_split(wikitext_path):
    text = load_text(wikitext_path.parent, split="test")
    # Compared by length and hash: a failing == on 1.3 MB strings makes pytest diff for minutes.
    expected = wikitext_path.read_text(encoding="utf-8")  # text mode: newlines normalized, as load_text does
    assert (len(text), hash(text)) == (len(expected), hash(expected))
    assert "\r" not in text


def test_wikitext_directory_ambiguous_split(wikitext_path):
    # No wiki.valid.raw there, and several .txt/.raw files: refuse to guess.
    with pytest.raises(TernlmError, match="cannot tell which file"):
        load_text(wikitext_path.parent, split="validation")


def test_directory_with_one_text_file():
    d = require_data("tinyshakespeare")
    assert load_text(d).startswith("First Citizen:")


def test_directory_without_text(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"\x00")
    with pytest.raises(TernlmError, match="no .txt or .raw file"):
        load_text(tmp_path)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b" \n\n\t", "empty"),
                                           (b"PK\x03\x04\x00\x00junk", "binary"),
                                           (b"\xff\xfe\xfa caf\xe9", "not UTF-8")])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "x.txt"
    p.write_bytes(content)
    with pytest.raises(TernlmError, match=match):
        load_text(p)


def test_missing_path(tmp_path):
    with pytest.raises(TernlmError, match="no such file"):
        load_text(tmp_path / "wiki.test.raw")


@pytest.mark.parametrize("s,hub", [("gpt2", True), ("wikitext", True), ("openai-community/gpt2", True),
                                   ("ucirvine/sms_spam", True), ("./gpt2", False), ("/data/x", False),
                                   ("a/b/c", False), ("input.txt", False), ("model.gguf", False),
                                   ("../x", False), ("", False), ("~/x", False)])
def test_looks_like_hub_id(s, hub):
    assert looks_like_hub_id(s) is hub


def test_hub_joins_text_column(monkeypatch):
    import datasets

    calls = []

    def fake(source, config=None, split=None, **kw):
        calls.append((source, config, split))
        return datasets.Dataset.from_dict({"text": [" = Title = \n", "", " body \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_text() == " = Title = \n\n\n\n\n body \n"
    load_text("karpathy/tiny_shakespeare", split="train")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("karpathy/tiny_shakespeare", None, "train")]


def test_hub_failure(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TernlmError, match=r"could not load text dataset 'wikitext' from the Hugging Face Hub.*: pass a local path instead"):
        load_text("wikitext")
