"""A tiny end-to-end pipeline: tiny random GPT-2, real tokenizer, real SMS data."""

import json

import pytest
import torch

from ternlm.pipeline import VARIANTS, PipelineConfig, run_pipeline

METRICS = ("accuracy", "precision", "recall", "f1")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-gpt2")
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    m.save_pretrained(d)
    gpt2_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    from tests.conftest import require_data

    out = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(
        model=str(tiny_model_dir), data=str(require_data("sms_spam", "SMSSpamCollection")),
        text=str(require_data("wikitext-2", "wiki.test.raw")), out=str(out), max_length=32,
        limit_train=96, limit_test=48, epochs=1, qat_epochs=3, qat_lr=1e-3, qat_seeds=2,
        ppl_max_length=32, ppl_stride=32, ppl_windows=2, latency_messages=8, robustness_limit=24,
        lm_qat_text=str(require_data("tinyshakespeare", "input.txt")), lm_qat_steps=3, gen_tokens=5,
        ptb_calib_tokens=256, ptb_seq_len=32, ptb_group_size=32, ptb_reconstruct_steps=2, distill_steps=2, distill_block_size=32,
        limit_val=40, qat_select=("absmean@1e-3", "ptbitnet@1e-3"), zeroshot_limit=3, zeroshot_tasks="piqa,lambada",
        zeroshot_tasks_dir=str(require_data("zeroshot")), progress=False)
    r = run_pipeline(cfg)
    return out, r


def test_every_variant_and_metric_is_reported(report):
    out, r = report
    on_disk = json.loads((out / "report.json").read_text())
    for rep in (r, on_disk):
        assert set(rep["variants"]) == set(VARIANTS) | {"ternary_ptbitnet_a8"}
        for name in rep["variants"]:
            v = rep["variants"][name]
            for m in METRICS:
                assert 0.0 <= v[m] <= 1.0, (name, m)
            assert v["cost"]["latency_batch1"]["ms_per_message"] > 0
            assert v["cost"]["latency_batch32"]["ms_per_message"] > 0
            assert set(v["robustness"]) >= {"clean", "typos", "case", "whitespace_punct", "url", "number"}
        assert rep["config"]["qat_seeds"] == 2 and len(rep["qat_seeds"]["f1"]) == 2
        assert set(rep["perplexity"]) == {"fp32", "ternary_ptq", "ternary_ptbitnet", "ternary_ptbitnet_a8",
                                          "ternary_ptbitnet_distilled", "ternary_qat", "int8_absmax", "int8_zeropoint",
                                          "llm_int8"}
        # a zero-shot column for every LM variant, and the numerics each ran with
        assert set(rep["zeroshot"]) == set(rep["perplexity"])
        for z in rep["zeroshot"].values():
            assert set(z["tasks"]) == {"piqa", "lambada"} and all(t["n_docs"] == 3 for t in z["tasks"].values())
            assert 0.0 <= z["average"] <= 1.0
        assert rep["zeroshot"]["ternary_ptbitnet"]["numerics"] == "W1.58A16"
        assert rep["zeroshot"]["ternary_ptbitnet_a8"]["numerics"] == "W1.58A8"
        assert rep["zeroshot"]["fp32"]["numerics"] == "float32"
        d = rep["distillation"]
        assert d["steps"] == 2 and d["tokens"] == 2 * 2 * 32
        assert d["ppl_before"] == rep["perplexity"]["ternary_ptbitnet"]["perplexity"]
        assert d["ppl_after"] == rep["perplexity"]["ternary_ptbitnet_distilled"]["perplexity"]
        assert all(p["perplexity"] > 1 for p in rep["perplexity"].values())
    assert r["ptbitnet"]["classifier"]["n_targets"] == 8 and r["ptbitnet"]["classifier"]["wall_s"] > 0
    for name in ("ternary_ptq", "ternary_ptbitnet", "ternary_qat"):
        assert r["variants"][name]["verify"]["ok"] and r["variants"][name]["verify"]["ternary_share"] == 1.0
    assert "llm_int8_backend" in r["variants"]["llm_int8"]
    # the QAT recipe is chosen on the validation split: both recipes tried, the best validation F1 kept
    sel = r["qat_selection"]
    assert [t["recipe"] for t in sel["tried"]] == ["absmean@1e-3", "ptbitnet@1e-3"]
    best = max(sel["tried"], key=lambda t: (t["val"]["f1"], t["val"]["accuracy"]))
    assert sel["chosen"] == best["recipe"] and r["qat_seeds"]["init"] == best["init"]
    assert r["variants"]["ternary_qat"]["init"] == best["init"] and r["variants"]["ternary_qat"]["lr"] == 1e-3
    # every variant has validation metrics and its numerics; pt-bitnet at both activation precisions
    for name, v in r["variants"].items():
        assert v["val"]["n"] == 40 and 0.0 <= v["val"]["f1"] <= 1.0, name
    assert r["variants"]["ternary_ptbitnet"]["numerics"] == "W1.58A16"
    assert r["variants"]["ternary_ptbitnet_a8"]["numerics"] == "W1.58A8"
    assert r["variants"]["fp32"]["numerics"] == "float32"
    # duplicates dropped before splitting: no test message is a training message
    assert r["data"]["n_duplicates_dropped"] > 300 and r["data"]["train_test_overlap"] == 0
    # every stage has its wall time and its own peak RSS; the run's peak is the largest of them
    names = [st["stage"] for st in r["stages"]]
    assert names[0] == "load data and model" and "3 ternary QAT + eval + packed eval" in names
    assert "5 distillation of the pt-bitnet LM" in names and "5 LM QAT (absmean start) + perplexity" in names
    assert all(st["seconds"] > 0 and st["peak_rss_mb"] > 0 for st in r["stages"])
    assert r["peak_rss_mb"] == max(st["peak_rss_mb"] for st in r["stages"])
    assert "## Where the time and memory go" in (out / "report.md").read_text()
    # the QAT classifier converted to packed TernaryLinear: far smaller in memory, same predictions' quality
    pk = r["packed"]
    assert pk["model_bytes_in_memory"] < pk["model_bytes_before"]
    assert abs(pk["f1"] - r["variants"]["ternary_qat"]["f1"]) <= 0.05
    assert "converted for inference" in (out / "report.md").read_text()
    assert "## Distillation of the pt-bitnet LM" in (out / "report.md").read_text()
    # the distilled LM is a packed ternlm checkpoint
    from ternlm.models.loading import source_kind

    assert source_kind(r["distillation"]["checkpoint"]) == "ternlm"


def test_qat_training_loss_went_down(report):
    _, r = report
    for hist in r["training"]["ternary_qat"]:
        loss = hist["loss"]
        assert len(loss) == 18  # 96 examples / 16 per batch * 3 epochs
        assert sum(loss[-5:]) / 5 < sum(loss[:3]) / 3


def test_markdown_and_plots_written(report):
    out, r = report
    md = (out / "report.md").read_text()
    for name in r["variants"]:
        assert f"| {name} |" in md
    assert "QAT recipe chosen on the validation" in md and "zero-shot average" in md
    for png in ("weights_hist.png", "training_curves.png", "metrics.png", "robustness.png"):
        assert (out / png).stat().st_size > 1000
        assert png in r["plots"]
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("kw, match", [
    (dict(qat_init="fp32"), "unknown qat_init"),
    (dict(qat_init="ptbitnet", ptbitnet=False), "qat_init ptbitnet needs the pt-bitnet variant"),
    (dict(lm_qat_batch_size=0), "lm_qat_batch_size must be >= 1"),
    (dict(qat_select=("fp32@1e-3",)), "bad QAT recipe 'fp32@1e-3'"),
    (dict(qat_select=("ptbitnet@fast",)), "bad QAT recipe"),
    (dict(qat_select=("ptbitnet@1e-4",), ptbitnet=False, qat_init="absmean"), "starts from pt-bitnet"),
    (dict(zeroshot_limit=5, zeroshot_tasks="piqa,mmlu"), "unknown task 'mmlu'"),
    (dict(limit_val=0), "limit_val must be >= 1"),
])
def test_config_rejects_bad_qat_settings(kw, match):
    from ternlm.errors import TernlmError

    with pytest.raises(TernlmError, match=match):
        PipelineConfig(**kw)


def test_qat_start_follows_the_ptbitnet_switch():
    assert PipelineConfig().qat_start() == "ptbitnet"
    assert PipelineConfig(ptbitnet=False).qat_start() == "absmean"
    assert PipelineConfig(qat_init="absmean").qat_start() == "absmean"
