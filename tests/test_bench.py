"""ternlm.bench on a tiny GPT-2: result structure only (a test never asserts a time)."""

import json

import pytest

from tests.conftest import require_data
from ternlm.bench import BenchConfig, bench_command, bench_main, format_table, run_bench
from ternlm.errors import TernlmError

ROW_KEYS = {"system", "variant", "decode_tok_s", "prefill_tok_s", "file_bytes", "peak_rss_mb", "bytes_per_token",
            "achieved_gbs", "pct_of_copy_bw", "x_hf_fp32", "x_llama_tq2_same_head", "x_llama_bench"}
ENV_KEYS = {"git_commit", "git_dirty", "cpu_model", "cpu_count", "threads", "kernel_level"}


def _tiny(**kw):
    # n_embd 256: TQ2_0 blocks need in_features divisible by 256
    return BenchConfig(model_config=str(require_data("gpt2-tokenizer")), new_tokens=4, repeats=1, profile=False,
                       ternlm_variants=("a8-2bit-int8",), hf_variants=("fp32",), llama_variants=("tq2_0-q8_0",),
                       overrides=dict(n_layer=1, n_embd=256, n_head=4, n_positions=64), **kw)


def test_run_bench_tiny(tmp_path):
    res = run_bench(_tiny(rounds=2), log=lambda *a: None)
    assert {"config", "command", "copy_bandwidth_gbs", "machine", "rows", "skipped"} <= res.keys()
    assert ENV_KEYS <= res["machine"].keys() and res["machine"]["threads"] == 2
    got = {(r["system"], r["variant"]) for r in res["rows"]} | {(s["system"], s["variant"]) for s in res["skipped"]}
    # llama.cpp's own llama-bench adds a row (or a skip) when it is there
    got -= {("llama_bench", "tq2_0-q8_0"), ("llama_bench", "all")}
    assert got == {("ternlm", "a8-2bit-int8"), ("hf", "fp32"), ("llama_cpp", "tq2_0-q8_0")}
    assert len(res["rows"]) == len({(r["system"], r["variant"]) for r in res["rows"]})  # one row each, all rounds
    systems = {r["system"] for r in res["rows"]}
    assert {"ternlm", "hf"} <= systems  # the peer may be skipped (not installed), never these
    for r in res["rows"]:
        assert ROW_KEYS <= r.keys()
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mb"] > 0 and r["bytes_per_token"] > 0
    for s in res["skipped"]:
        assert s["reason"]
    assert "ternlm" in format_table(res)
    json.dumps(res, default=str)


def test_config_validation_and_command():
    with pytest.raises(TernlmError):
        BenchConfig(ternlm_variants=("a8-3bit-int8",))
    with pytest.raises(TernlmError):
        BenchConfig(systems=("vllm",))
    with pytest.raises(TernlmError):
        BenchConfig(rounds=0)
    assert bench_command(BenchConfig()) == "ternlm bench"
    assert "--threads 4" in bench_command(BenchConfig(threads=4))


def test_bench_main_accepts_args_like_objects(monkeypatch, tmp_path):
    seen = {}

    def fake(cfg, log=print):
        seen["cfg"] = cfg
        return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": 1.0, "rows": [],
                "skipped": []}

    monkeypatch.setattr("ternlm.bench.run.run_bench", fake)

    class Args:
        threads = 3
        systems = "ternlm,hf"
        json = str(tmp_path / "out.json")

    bench_main(Args())
    assert seen["cfg"].threads == 3 and seen["cfg"].systems == ("ternlm", "hf")
    assert json.loads((tmp_path / "out.json").read_text())["config"]["threads"] == 3


@pytest.mark.slow
def test_model_mode_benchmarks_a_checkpoint_directory(tmp_path):
    import transformers

    from ternlm.checkpoint import save_pretrained
    from ternlm.config import TernaryConfig
    from ternlm.conversion import convert

    tok = transformers.AutoTokenizer.from_pretrained(require_data("gpt2-tokenizer"))
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64)
    model = convert(transformers.LlamaForCausalLM(cfg).eval(), TernaryConfig(act_bits=8), fmt="2bit")
    save_pretrained(model, tok, tmp_path / "ckpt")
    with pytest.raises(TernlmError, match="--llama-gguf"):
        BenchConfig(llama_gguf=str(tmp_path / "x.gguf"))
    res = run_bench(BenchConfig(model=str(tmp_path / "ckpt"), new_tokens=4, repeats=1, profile=True,
                                ternlm_variants=("a8-2bit-int8",)), log=lambda *a: None)
    got = {(r["system"], r["variant"]) for r in res["rows"]}
    assert got == {("ternlm", "engine-int8"), ("hf", "generate")}
    assert [s["variant"] for s in res["skipped"]] == ["gguf"]
    for r in res["rows"]:
        assert ROW_KEYS <= r.keys() and r["peak_rss_mb"] > 0 and r["bytes_per_token"] > 0
    assert "--model" in res["command"] and "decode profile" in format_table(res)
