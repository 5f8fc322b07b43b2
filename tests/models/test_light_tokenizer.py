"""The light tokenizer (``tokenizers`` alone) encodes and decodes exactly as AutoTokenizer does, and
is refused for tokenizers with Python-side behaviour."""

import json

import pytest

from tests.conftest import require_data
from ternlm.models.sources import light_tokenizer, load_tokenizer

TEXTS = ["The history of the city", " leading space", "Hello\n\nworld  ünïcödé 🙂 <|endoftext|> <|im_end|> x",
         "\xff odd \u200b bytes", "a"]


def _saved(tmp_path, which="gpt2"):
    """A tokenizer as a ternlm checkpoint holds it: saved by save_pretrained (tokenizer.json + config)."""
    src = require_data("gpt2-tokenizer") if which == "gpt2" else require_data("smollm2-135m")  # GGUF vocab
    load_tokenizer(src).save_pretrained(tmp_path)
    return tmp_path


def _auto(d):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("which", ["gpt2", "smollm2"])
def test_same_ids_text_and_special_ids_as_autotokenizer(which, tmp_path):
    d = _saved(tmp_path, which)
    light, hf = light_tokenizer(d), _auto(d)
    assert light is not None
    for t in TEXTS:
        ids = hf(t)["input_ids"]
        assert light(t).input_ids == ids
        assert light(t, return_tensors="pt").input_ids[0].tolist() == ids
        seq = ids + [hf.eos_token_id, 7, 300]
        for skip in (True, False):
            assert light.decode(seq, skip_special_tokens=skip) == hf.decode(seq, skip_special_tokens=skip)
    assert (light.eos_token_id, light.pad_token_id) == (hf.eos_token_id, hf.pad_token_id)


@pytest.mark.parametrize("change", [{"add_bos_token": True}, {"clean_up_tokenization_spaces": True},
                                    {"tokenizer_class": "LlamaTokenizer"}, {"add_prefix_space": True}])
def test_python_side_behaviour_means_no_light_tokenizer(change, tmp_path):
    d = _saved(tmp_path)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf.update(change)
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    assert light_tokenizer(d) is None


def test_no_tokenizer_json_means_no_light_tokenizer():
    assert light_tokenizer(require_data("gpt2-tokenizer")) is None  # vocab.json + merges.txt only
