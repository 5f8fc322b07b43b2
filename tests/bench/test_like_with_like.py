"""ternlm bench compares like with like: the environment record, bytes per token counted from a GGUF
file's tensors, llama-bench's JSON, and the repeatable --llama-gguf flag. No model is run here."""

import argparse
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ternlm.bench import BenchConfig, add_arguments, bench_command, bench_main, format_table
from ternlm.bench.config import llama_bench_tool
from ternlm.bench.report import environment_line, ratios
from ternlm.bench.run import _llama_jobs, environment, git_state, gguf_bytes_per_token
from ternlm.bench.workers import _worker_llama_bench, model_bytes, parse_llama_bench
from ternlm.errors import TernlmError

SAMPLE = Path(__file__).parent / "data" / "llama_bench_sample.json"  # llama-bench -p 16 -n 16 -r 1 -o json
ENV_KEYS = {"git_commit", "git_dirty", "ternlm", "cpu_model", "cpu_count", "physical_cores", "threads",
            "kernel_level", "platform", "torch", "python"}


# --------------------------------------------------------------------------------------------
# environment record


def test_environment_record_fields():
    env = environment(3)
    assert ENV_KEYS <= env.keys()
    assert env["threads"] == 3 and env["cpu_count"] >= 1
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]
    assert env["git_commit"] == "unknown" or len(env["git_commit"]) >= 7
    assert env["kernel_level"] is None or isinstance(env["kernel_level"], str)
    json.dumps(env)
    line = environment_line(env)
    assert env["cpu_model"] in line and "3 threads" in line and env["git_commit"] in line


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_state_commit_dirty_and_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) == ("unknown", None)  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert git_state(repo) == ("unknown", None)  # no commit yet
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert git_state(repo) == (head, False)
    (repo / "untracked.txt").write_text("x")
    assert git_state(repo) == (head, False)  # untracked files do not count
    (repo / "a.txt").write_text("2")
    assert git_state(repo) == (head, True)
    (repo / "site-packages").mkdir()  # an installed copy inside another repository's tree
    assert git_state(repo / "site-packages") == ("unknown", None)


def test_table_starts_with_the_environment():
    env = {**environment(2), "git_commit": "abc1234", "git_dirty": True}
    res = {"rows": [], "skipped": [], "copy_bandwidth_gbs": 1.0, "command": "ternlm bench", "machine": env}
    first = format_table(res).splitlines()[0]
    assert "abc1234 (dirty)" in first and "2 threads" in first
    assert format_table({**res, "machine": {}}).startswith("| system")  # older results: table only


# --------------------------------------------------------------------------------------------
# bytes per token from a GGUF file's tensors


def _tiny_gguf(path, tied=False, C=32, V=64, P=16):
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "gpt2")
    sizes = {}

    def add(name, arr, qtype=None):
        if qtype is not None:
            data = quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            data = arr
            w.add_tensor(name, arr)
        sizes[name] = data.nbytes

    add("token_embd.weight", rng.standard_normal((V, C)).astype(np.float16))
    add("position_embd.weight", rng.standard_normal((P, C)).astype(np.float32))
    add("blk.0.attn_norm.weight", np.ones(C, np.float32))
    add("blk.0.attn_qkv.weight", rng.standard_normal((3 * C, C)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    add("blk.0.ffn_down.weight", rng.standard_normal((C, 4 * C)).astype(np.float16))
    add("output_norm.weight", np.ones(C, np.float32))
    if not tied:
        add("output.weight", rng.standard_normal((V, C)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def test_gguf_bytes_per_token_counts_one_embedding_row(tmp_path):
    sizes = _tiny_gguf(tmp_path / "m.gguf")
    C, V, P = 32, 64, 16
    full = sum(sizes.values())
    # everything but the embedding tables, plus one row of each (f16 tokens, f32 positions)
    want = full - sizes["token_embd.weight"] - sizes["position_embd.weight"] + C * 2 + C * 4
    assert sizes["token_embd.weight"] == V * C * 2 and sizes["position_embd.weight"] == P * C * 4
    assert sizes["output.weight"] == V * C // 32 * 34  # Q8_0 blocks: 34 bytes per 32 weights
    assert gguf_bytes_per_token(tmp_path / "m.gguf") == want


def test_gguf_bytes_per_token_tied_head_reads_the_whole_table(tmp_path):
    sizes = _tiny_gguf(tmp_path / "t.gguf", tied=True)
    want = sum(sizes.values()) - sizes["position_embd.weight"] + 32 * 4
    assert gguf_bytes_per_token(tmp_path / "t.gguf") == want


def test_gguf_bytes_per_token_rejects_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(TernlmError, match="not a readable GGUF"):
        gguf_bytes_per_token(tmp_path / "x.gguf")


def test_hf_model_bytes_count_one_row_of_untied_tables():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16)).eval()
    params, decode = model_bytes(m)
    # wte is tied to the head (read in full); wpe is read one row
    assert params - decode == (16 - 1) * 32 * 4
    m.lm_head.weight = __import__("torch").nn.Parameter(m.lm_head.weight.detach().clone())  # untie
    params2, decode2 = model_bytes(m)
    assert params2 == params + 100 * 32 * 4 and params2 - decode2 == (16 - 1) * 32 * 4 + (100 - 1) * 32 * 4


# --------------------------------------------------------------------------------------------
# llama-bench


def test_parse_llama_bench_sample():
    out = parse_llama_bench(SAMPLE.read_text())
    sample = json.loads(SAMPLE.read_text())
    pp = next(t for t in sample if t["n_gen"] == 0)
    tg = next(t for t in sample if t["n_prompt"] == 0)
    assert out["prefill_tok_s"] == max(pp["samples_ts"]) and out["prefill_mean_tok_s"] == pp["avg_ts"]
    assert out["decode_tok_s"] == max(tg["samples_ts"]) and out["decode_mean_tok_s"] == tg["avg_ts"]
    assert out["n_new_tokens"] == tg["n_gen"] == 16 and out["n_prompt_tokens"] == pp["n_prompt"] == 16
    assert out["llama_bench"]["build_commit"] == sample[0]["build_commit"]
    assert out["llama_bench"]["n_threads"] == sample[0]["n_threads"]


def test_parse_llama_bench_best_sample_and_errors():
    sample = json.loads(SAMPLE.read_text())
    for t in sample:
        t["samples_ts"] = [10.0, 12.5, 11.0]
    assert parse_llama_bench(json.dumps(sample))["decode_tok_s"] == 12.5
    with pytest.raises(TernlmError, match="no JSON"):
        parse_llama_bench("| model | size |")
    with pytest.raises(TernlmError, match="tg"):
        parse_llama_bench(json.dumps([t for t in sample if t["n_gen"] == 0]))


def _fake_llama_bench(path: Path, crash_with_repack: bool = False) -> str:
    """A stand-in llama-bench printing the saved sample (optionally dying by SIGSEGV unless --repack 0)."""
    crash = 'case " $* " in *" --repack 0 "*) ;; *) kill -SEGV $$;; esac\n' if crash_with_repack else ""
    path.write_text(f"#!/bin/sh\n{crash}echo \"$@\" > {path}.args\ncat {SAMPLE}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("crash", [False, True])
def test_llama_bench_worker_runs_the_tool(tmp_path, crash):
    tool = _fake_llama_bench(tmp_path / "llama-bench", crash_with_repack=crash)
    spec = {"llama_bench": tool, "gguf": "m.gguf", "prompt_tokens": 16, "new_tokens": 16, "threads": 2, "repeats": 3}
    out = _worker_llama_bench(spec)
    args = Path(tool + ".args").read_text().split()
    assert args[:12] == ["-m", "m.gguf", "-p", "16", "-n", "16", "-t", "2", "-r", "3", "-ngl", "0"]
    assert ("--repack" in args) == crash and out["llama_bench"]["retried_without_repack"] == crash
    assert out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0 and out["peak_rss_mb"] > 0


def test_llama_bench_tool_resolution(tmp_path, monkeypatch):
    tool = _fake_llama_bench(tmp_path / "llama-bench")
    assert llama_bench_tool(BenchConfig(llama_bench=tool)) == (tool, "")
    assert llama_bench_tool(BenchConfig(llama_bench="off"))[0] is None
    monkeypatch.setattr("ternlm.bench.config.DEFAULT_LLAMA_BENCH", str(tmp_path / "none" / "llama-bench"))
    path, why = llama_bench_tool(BenchConfig())
    assert path is None and "setup_llama_peer.sh" in why
    with pytest.raises(TernlmError, match="--llama-bench .*no such file"):
        BenchConfig(llama_bench=str(tmp_path / "missing"))


def test_llama_jobs_one_row_per_file_and_tool(tmp_path):
    _tiny_gguf(tmp_path / "Q2_K.gguf")
    tool = _fake_llama_bench(tmp_path / "llama-bench")
    cfg = BenchConfig(llama_bench=tool, llama_python=str(tmp_path / "no-python"),
                      llama_gguf=(str(tmp_path / "Q2_K.gguf"),))
    skipped = []
    base = {"threads": 2, "prompt_tokens": 4, "new_tokens": 4, "repeats": 1, "vocab_size": 10, "seed": 0}
    jobs = _llama_jobs(cfg, [("Q2_K", str(tmp_path / "Q2_K.gguf"), {"head": "gguf"})], base, skipped, lambda *a: None)
    # no llama_cpp interpreter: the bindings' row is skipped, llama-bench's is not
    assert [(j[0], j[1]) for j in jobs] == [("llama_bench", "Q2_K")]
    assert [(s["system"], s["variant"]) for s in skipped] == [("llama_cpp", "Q2_K")]
    size, bpt, extra = jobs[0][5]({})
    assert size == os.path.getsize(tmp_path / "Q2_K.gguf") and bpt == gguf_bytes_per_token(tmp_path / "Q2_K.gguf")
    assert extra == {"head": "gguf"}


def test_llama_bench_ratio_and_column():
    rows = [{"system": "ternlm", "variant": "a8-2bit-int8", "head": "int8", "decode_tok_s": 30.0},
            {"system": "llama_cpp", "variant": "tq2_0-q8_0", "head": "int8", "decode_tok_s": 15.0},
            {"system": "llama_bench", "variant": "tq2_0-q8_0", "head": "int8", "decode_tok_s": 20.0}]
    ratios(rows)
    assert rows[0]["x_llama_tq2_same_head"] == 2.0 and rows[0]["x_llama_bench"] == 1.5
    assert rows[2]["x_llama_bench"] is None
    for r in rows:
        r.update(prefill_tok_s=1.0, file_bytes=10**6, bytes_per_token=10**6, peak_rss_mb=1.0, achieved_gbs=1.0,
                 pct_of_copy_bw=1.0, x_hf_fp32=None)
    table = format_table({"rows": rows, "skipped": [], "copy_bandwidth_gbs": 1.0, "command": "ternlm bench"})
    assert "x llama-bench" in table and "llama_bench" in table
    lines = table.splitlines()
    col = [c.strip() for c in lines[0].split("|")].index("MB/token")
    assert [line.split("|")[col].strip() for line in lines[2:5]] == ["1.0"] * 3  # on every row


# --------------------------------------------------------------------------------------------
# --llama-gguf, repeatable


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_llama_gguf_is_repeatable(tmp_path, monkeypatch):
    a, b = tmp_path / "Q2_K.gguf", tmp_path / "IQ2_M.gguf"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    seen = {}

    def fake(cfg, log=print):
        seen["cfg"] = cfg
        return {"config": cfg.to_dict(), "command": bench_command(cfg), "copy_bandwidth_gbs": 1.0, "rows": [],
                "skipped": []}

    monkeypatch.setattr("ternlm.bench.run.run_bench", fake)
    bench_main(_parse(["--llama-gguf", str(a), "--llama-gguf", str(b), "--threads", "2"]))
    cfg = seen["cfg"]
    assert cfg.llama_gguf == (str(a), str(b))
    cmd = bench_command(cfg)
    assert cmd.count("--llama-gguf") == 2 and str(a) in cmd and str(b) in cmd
    assert _parse([]).llama_gguf is None and BenchConfig().llama_gguf == ()
    assert BenchConfig(llama_gguf=str(a)).llama_gguf == (str(a),)  # one path as a string


def test_llama_gguf_errors(tmp_path):
    with pytest.raises(TernlmError, match=r"--llama-gguf .*missing\.gguf: no such file"):
        BenchConfig(llama_gguf=(str(tmp_path / "missing.gguf"),))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "Q2_K.gguf").write_bytes(b"x")
    (tmp_path / "Q2_K.gguf").write_bytes(b"x")
    with pytest.raises(TernlmError, match="Q2_K"):
        BenchConfig(llama_gguf=(str(tmp_path / "Q2_K.gguf"), str(tmp_path / "a" / "Q2_K.gguf")))
    (tmp_path / "f16.gguf").write_bytes(b"x")
    with pytest.raises(TernlmError, match="f16"):  # the synthetic run's own f16 row
        BenchConfig(llama_gguf=(str(tmp_path / "f16.gguf"),))
