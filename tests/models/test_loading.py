import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2LMHeadModel

from tests.conftest import require_data
from ternlm.errors import TernlmError
from ternlm.models.loading import load, load_causal_lm, load_classifier, load_tokenizer, save_model, source_kind


@pytest.fixture
def tiny_dir(tmp_path, tiny_gpt2_config, gpt2_tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config).eval()
    out = save_model(model, gpt2_tokenizer, tmp_path / "tiny")
    return out, model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- round trips -------------------------------------------------------------------------------

def test_causal_lm_round_trip(tiny_dir):
    out, ref = tiny_dir
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = load_causal_lm(out)
    assert type(model) is type(ref) and not model.training and model.dtype == torch.float32
    assert _same_weights(model, ref)
    ids = torch.tensor([[464, 3290, 318]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_dtype(tiny_dir):
    out, _ = tiny_dir
    assert load_causal_lm(out, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_classifier_from_lm_checkpoint(tiny_dir, gpt2_tokenizer):
    out, ref = tiny_dir
    clf = load_classifier(out)
    assert not clf.training and clf.config.num_labels == 2
    assert clf.config.pad_token_id == gpt2_tokenizer.eos_token_id
    ref_sd = ref.transformer.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in clf.transformer.state_dict().items())
    batch = gpt2_tokenizer(["free prize, text WIN now", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = clf(**batch).logits
        alone = clf(**gpt2_tokenizer(["hi"], return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    # Padding must not change the short message's score: the last real token is pooled.
    torch.testing.assert_close(logits[1], alone[0])


def test_classifier_round_trip(tiny_dir, gpt2_tokenizer, tmp_path):
    clf = load_classifier(tiny_dir[0], num_labels=3)
    out = save_model(clf, gpt2_tokenizer, tmp_path / "clf")
    again = load_classifier(out, num_labels=3)
    assert _same_weights(clf, again)


def test_tokenizer(gpt2_tokenizer_dir, tiny_dir):
    tok = load_tokenizer(gpt2_tokenizer_dir)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert load_tokenizer(tiny_dir[0])("hello world").input_ids == tok("hello world").input_ids


def test_tokenizer_missing_files(tiny_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (tiny_dir[0] / name).unlink(missing_ok=True)
    with pytest.raises(TernlmError, match="no tokenizer files"):
        load_tokenizer(tiny_dir[0])


# --- config-only directories and random init ---------------------------------------------------

def test_config_only_dir_needs_random_init(gpt2_tokenizer_dir):
    with pytest.raises(TernlmError, match=r"no weights in .*random_init=True / --random-init"):
        load_causal_lm(gpt2_tokenizer_dir)
    with pytest.raises(TernlmError, match="no weights"):
        load_classifier(gpt2_tokenizer_dir)


def test_random_init_from_real_gpt2_config(gpt2_tokenizer_dir):
    clf = load_classifier(gpt2_tokenizer_dir, random_init=True)
    assert clf.config.n_layer == 12 and clf.config.n_embd == 768
    assert clf.config.pad_token_id == 50256 and not clf.training


def test_random_init_follows_torch_seed(tmp_path, tiny_gpt2_config):
    tiny_gpt2_config.save_pretrained(tmp_path)
    torch.manual_seed(1)
    a = load_causal_lm(tmp_path, random_init=True)
    torch.manual_seed(1)
    b = load_causal_lm(tmp_path, random_init=True)
    assert _same_weights(a, b) and not a.training


# --- errors ------------------------------------------------------------------------------------

def test_truncated_safetensors(tiny_dir):
    weights = tiny_dir[0] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TernlmError, match="cannot load weights from") as e:
        load_causal_lm(tiny_dir[0])
    assert "\n" not in str(e.value)


def test_weights_not_matching_config(tiny_dir):
    cfg_path = tiny_dir[0] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_layer"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TernlmError, match="do not match its config"):
        load_causal_lm(tiny_dir[0])


def test_bert_is_not_a_causal_lm(tmp_path):
    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(TernlmError, match="'bert' is an encoder"):
        load_causal_lm(tmp_path)
    with pytest.raises(TernlmError, match="'bert' is an encoder"):
        load_causal_lm(tmp_path, random_init=True)


def test_model_type_without_head(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(TernlmError, match="'vit' has no causal-lm head"):
        load_causal_lm(tmp_path, random_init=True)


def test_missing_path(tmp_path):
    with pytest.raises(TernlmError, match="no such file or directory"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(TernlmError, match="no such file or directory"):
        load_tokenizer("./not/a/model")


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TernlmError, match="no config.json"):
        load_causal_lm(tmp_path)


def test_non_gguf_file(tiny_dir):
    with pytest.raises(TernlmError, match="pass the model directory"):
        load_causal_lm(tiny_dir[0] / "config.json")


def test_named_gguf_missing(tiny_dir):
    with pytest.raises(TernlmError, match="no GGUF file 'x.gguf'"):
        load_causal_lm(tiny_dir[0], gguf_file="x.gguf")


def test_hub_offline(monkeypatch):
    """An unreachable hub is probed once and the load runs from the cache only (no retry loop)."""
    from ternlm import hub

    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert hub.hub_reachable() is False
        assert hub.hub_kwargs() == {"local_files_only": True}
        with pytest.raises(TernlmError, match=r"could not load model 'gpt2' from the Hugging Face Hub "
                                              r"\(unreachable: offline\?\): pass a local path instead"):
            load_causal_lm("gpt2")
        with pytest.raises(TernlmError, match="could not load model 'gpt2'"):
            load_tokenizer("gpt2")
    finally:
        hub.hub_reachable.cache_clear()


# --- saving ------------------------------------------------------------------------------------

def test_save_replaces_existing_dir(tiny_dir, tiny_gpt2_config, gpt2_tokenizer):
    out, _ = tiny_dir
    (out / "stale.txt").write_text("from an older save")
    torch.manual_seed(5)
    new = GPT2LMHeadModel(tiny_gpt2_config)
    assert save_model(new, gpt2_tokenizer, out) == out.resolve()
    assert not (out / "stale.txt").exists()
    assert _same_weights(load_causal_lm(out), new)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_failed_save_keeps_existing_dir(tiny_dir):
    out, ref = tiny_dir

    class Broken:
        def save_pretrained(self, path, **kw):
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(Broken(), None, out)
    assert _same_weights(load_causal_lm(out), ref)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_save_onto_a_file(tmp_path, tiny_dir):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TernlmError, match="not a directory"):
        save_model(tiny_dir[1], None, f)


# --- GGUF: the SmolLM2-135M Q4_1 file in the data dir (required in CI) --------------------------

def _gguf_dir():
    return require_data("smollm2-135m")


@pytest.mark.slow
def test_gguf_causal_lm_is_pretrained():
    d = _gguf_dir()
    tok = load_tokenizer(d)
    model = load_causal_lm(d)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tok.decode(next_id).strip() == "Paris"


@pytest.mark.slow
def test_gguf_classifier():
    d = _gguf_dir()
    gguf = next(d.glob("*.gguf"))
    clf = load_classifier(gguf)  # a path to the .gguf file works as well as its directory
    assert type(clf).__name__ == "LlamaForSequenceClassification" and not clf.training
    eos = clf.config.eos_token_id
    assert clf.config.pad_token_id == (eos[0] if isinstance(eos, list) else eos)
    with torch.no_grad():
        assert clf(torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


# --- ternlm.load: one loader for every kind of source -------------------------------------------

def test_load_recognises_every_kind(tmp_path, tiny_dir, gpt2_tokenizer):
    from ternlm.checkpoint import save_pretrained
    from ternlm.conversion import convert
    from ternlm.export.gguf import export_gguf
    from ternlm.nn.surgery import ternary_linears

    hf_dir, ref = tiny_dir
    assert source_kind(hf_dir) == "hf"
    model, tok = load(hf_dir)
    assert _same_weights(model, ref) and tok is not None and not ternary_linears(model)

    torch.manual_seed(0)
    big = GPT2LMHeadModel(type(ref.config)(n_layer=1, n_embd=256, n_head=4, n_positions=64)).eval()
    ck = save_pretrained(convert(big), gpt2_tokenizer, tmp_path / "ck")
    assert source_kind(ck) == "ternlm"
    packed, tok = load(ck)
    assert len(ternary_linears(packed)) == 4 and tok is not None

    gg = export_gguf(ck, tmp_path / "m.gguf", "tq2_0")
    assert source_kind(gg) == "ternlm-gguf"
    back, _ = load(gg, tokenizer=False)
    assert len(ternary_linears(back)) == 4
    for (n, a), (_, b) in zip(ternary_linears(packed), ternary_linears(back)):
        assert torch.equal(a.packed, b.packed), n

    with pytest.raises(TernlmError, match="packed ternary causal LM; task='classification' needs a float model"):
        load(ck, task="classification")
    with pytest.raises(TernlmError, match="unknown task 'seq2seq'; choose one of causal-lm, classification"):
        load(hf_dir, task="seq2seq")


def test_load_smollm2_gguf_is_plain_gguf():
    d = require_data("smollm2-135m")
    assert source_kind(d) == "gguf"


def test_quiet_transformers_silences_the_gguf_readers_bar_and_restores_it():
    pytest.importorskip("gguf")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from ternlm.models.loading import quiet_transformers

    before = gguf_utils.tqdm
    with quiet_transformers(True):
        bar = gguf_utils.tqdm(range(3))
        assert bar.disable
        assert not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is before
    assert hf_logging.is_progress_bar_enabled()
