"""The model card written beside checkpoints."""

import pytest
import torch

from ternlm.checkpoint import from_pretrained, read_record, save_pretrained
from ternlm.config import QuantConfig, TernaryConfig
from ternlm.conversion import convert
from ternlm.errors import TernlmError
from ternlm.modelcard import render_model_card, source_info, write_model_card
from ternlm.nn.verify import verify


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=50257))
    convert(m, QuantConfig(weights=TernaryConfig(granularity="per_group", group_size=96, act_bits=8)))
    return save_pretrained(m, gpt2_tokenizer, tmp_path_factory.mktemp("card") / "ck")


def _front(card: str) -> list[str]:
    assert card.startswith("---\n")
    return card.split("---\n")[1].splitlines()


def test_card_has_metadata_and_the_verified_facts(ckpt):
    path = write_model_card(ckpt, method="absmean PTQ (round to nearest)", settings={"group_size": 96},
                            metrics={"perplexity (wikitext-2 test, 10 x 512)": 1234.5678},
                            base_model="openai-community/gpt2", license="mit", tags=("ptq",))
    card = path.read_text()
    front = _front(card)
    assert "base_model: openai-community/gpt2" in front and "library_name: ternlm" in front
    assert "license: mit" in front and "- ptq" in front and "- ternary" in front
    totals = verify(from_pretrained(ckpt)).totals()
    assert f"{100 * totals['zeros_share']:.2f}%" in card and "| ternary share | 100.00% |" in card
    assert f"{totals['bits_per_weight']:.3f} (information)" in card
    assert f"{totals['storage_bits_per_weight']:.3f} (as stored)" in card
    assert totals["storage_bits_per_weight"] > 2.0  # the scales are counted
    assert "per_group (group size 96)" in card and "W1.58A8" in card and "| 1235 |" in card
    assert "ternlm.load(" in card and "ternlm export" in card and "llama-cli -m model.gguf" in card
    assert "## Limitations" in card and "absmean PTQ" in card
    read_record(ckpt)  # the checkpoint is still a checkpoint


def test_unknown_facts_are_left_out(ckpt):
    card = render_model_card(model_type="gpt2", record=read_record(ckpt), totals=None, method="m")
    front = _front(card)
    assert not any(line.startswith(("base_model", "license")) for line in front)
    assert "## Measured" not in card and "## Size and verification" not in card


def test_card_needs_a_checkpoint(tmp_path):
    with pytest.raises(TernlmError, match="not a ternlm checkpoint"):
        write_model_card(tmp_path, method="x")


def test_source_info_from_a_hf_directory_and_a_hub_id(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/base\ntags:\n- x\n---\n# hi\n")
    (tmp_path / "config.json").write_text('{"_name_or_path": "org/model"}')
    assert source_info(tmp_path) == {"base_model": "org/base", "license": "apache-2.0", "name": "org/model"}
    assert source_info("openai-community/gpt2")["base_model"] == "openai-community/gpt2"
    assert source_info(tmp_path / "missing" / "file.gguf") == {"base_model": None, "license": None, "name": None}


@pytest.mark.data
def test_source_info_carries_the_gguf_license(data_dir):
    info = source_info(data_dir / "smollm2-135m")
    assert info["license"] == "apache-2.0" and "135M" in info["name"]
