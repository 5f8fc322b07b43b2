"""Streaming quantization: identical to the in-memory path, resumable, bounded memory, checked inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ternlm.errors import TernlmError
from ternlm.quantization import QuantizeConfig, quantize
from ternlm.streaming import make_plan, stream_quantize
from ternlm.streaming import quantize as sq
from ternlm.streaming.files import SourceFiles

REPO = Path(__file__).resolve().parents[2]


def tiny_llama(path: Path, *, hidden=64, layers=3, inter=96, vocab=128, tie=False, shard="40KB", dtype=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def assert_same_tensors(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].reshape(-1).view(torch.uint8).equal(tb[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("kw,qc", [
    (dict(), dict()),
    (dict(tie=True, dtype=torch.bfloat16), dict(fmt="base3", granularity="per_group", group_size=32,
                                                 float_dtype="bf16", act_bits=None)),
])
def test_streaming_equals_in_memory(tmp_path, kw, qc):
    src = tiny_llama(tmp_path / "src", **kw)
    assert (src / "model.safetensors.index.json").is_file()  # really sharded
    cfg = QuantizeConfig(**qc)
    mem = quantize(src, tmp_path / "mem", cfg, progress=False)
    st = stream_quantize(src, tmp_path / "st", cfg, progress=False)
    assert_same_tensors(mem, st)
    for name in ("config.json", "ternlm_quantization.json", "generation_config.json"):
        assert (mem / name).read_text() == (st / name).read_text(), name
    assert not sq.partial_dir(st).exists()
    # the sharded output loads and computes what the single-file one does
    from ternlm import load

    a, _ = load(mem)
    b, _ = load(st)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_embedding_rows_read_in_blocks_equal_whole_table(tmp_path):
    """int8 rows quantized from row blocks read off disk (as streaming does for a large embedding)
    equal the whole-table quantizer, wherever the blocks are cut."""
    from ternlm.nn.embedding import quantize_row_blocks, quantize_rows

    src = tiny_llama(tmp_path / "src", vocab=1000)
    files = SourceFiles(src)
    name = "model.embed_tokens.weight"
    want_q, want_s = quantize_rows(files.get(name).float())
    for chunk in (64 * 4, 64 * 4 * 37, 1 << 30):  # one row, 37 rows, the whole table at once
        blocks = list(files.row_blocks(name, torch.float32, chunk_bytes=chunk))
        assert len(blocks) == {64 * 4: 1000, 64 * 4 * 37: 28, 1 << 30: 1}[chunk]
        q, sc = quantize_row_blocks(tuple(files.entries[name].shape), iter(blocks))
        assert torch.equal(q, want_q) and torch.equal(sc, want_s)


def test_verify_checkpoint_reads_layer_by_layer_and_equals_verify(tmp_path):
    """The model card's check of a saved checkpoint (one layer in memory) equals ``verify`` of the
    loaded model, row for row."""
    from dataclasses import asdict

    from ternlm.checkpoint import from_pretrained, verify_checkpoint
    from ternlm.nn.verify import verify

    src = tiny_llama(tmp_path / "src")
    for qc in (dict(), dict(granularity="per_group", group_size=32, fmt="base3")):
        out = stream_quantize(src, tmp_path / f"st-{len(qc)}", QuantizeConfig(**qc), progress=False)
        rec = json.loads((out / "ternlm_quantization.json").read_text())
        a = verify_checkpoint(out)
        b = verify(from_pretrained(out), rec["targets"])
        assert a.ok and len(a.layers) == len(rec["targets"]) == 21
        for x, y in zip(a.layers, b.layers):
            x, y = asdict(x), asdict(y)
            assert {k: v for k, v in x.items() if isinstance(v, (str, bool))} == \
                {k: v for k, v in y.items() if isinstance(v, (str, bool))}
            assert [v for v in x.values() if not isinstance(v, (str, bool))] == \
                pytest.approx([v for v in y.values() if not isinstance(v, (str, bool))], rel=1e-6)


def test_resume_after_kill_equals_unbroken(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "src")
    cfg = QuantizeConfig()
    whole = stream_quantize(src, tmp_path / "whole", cfg, progress=False)

    real, calls = sq._convert_unit, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third block was being quantized
        return real(*a, **k)

    monkeypatch.setattr(sq, "_convert_unit", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_quantize(src, out, cfg, progress=False)
    assert not out.exists()  # never a half-written output
    part = sq.partial_dir(out)
    assert (part / sq.INCOMPLETE).is_file()
    assert json.loads((part / sq.PROGRESS_FILE).read_text())["done"] == ["model.layers.0", "model.layers.1"]
    with pytest.raises(TernlmError, match="--resume"):
        stream_quantize(src, out, cfg, progress=False)
    with pytest.raises(TernlmError, match="different source or settings"):
        stream_quantize(src, out, QuantizeConfig(fmt="base3"), resume=True, progress=False)
    monkeypatch.setattr(sq, "_convert_unit", real)
    calls.clear()
    stream_quantize(src, out, cfg, resume=True, progress=False)
    assert not part.exists()
    for f in sorted(p.name for p in whole.iterdir()):
        assert (whole / f).read_bytes() == (out / f).read_bytes(), f


def test_bad_sources_fail_before_work(tmp_path):
    src = tiny_llama(tmp_path / "src")
    shards = sorted(src.glob("model-*.safetensors"))
    cfg = QuantizeConfig()
    # truncated shard: named, before any output exists
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(TernlmError, match=shards[1].name + " is truncated"):
        stream_quantize(src, tmp_path / "o", cfg, progress=False)
    shards[1].write_bytes(data)
    # index naming a missing file
    shards[2].rename(tmp_path / "moved")
    with pytest.raises(TernlmError, match=f"names {shards[2].name}, which does not exist"):
        stream_quantize(src, tmp_path / "o", cfg, progress=False)
    assert not (tmp_path / "o").exists() and not sq.partial_dir(tmp_path / "o").exists()
    (tmp_path / "moved").rename(shards[2])
    with pytest.raises(TernlmError, match="no tokenizer files"):
        stream_quantize(src, tmp_path / "o", QuantizeConfig(method="pt-bitnet", calib="x"), progress=False)


def test_not_enough_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    src = tiny_llama(tmp_path / "src")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 1000))
    with pytest.raises(TernlmError, match="not enough disk"):
        stream_quantize(src, tmp_path / "o", QuantizeConfig(), progress=False)
    assert not sq.partial_dir(tmp_path / "o").exists()


_MEASURE = """
import sys
import ternlm.streaming, transformers, safetensors.torch, transformers.models.llama.modeling_llama
from ternlm.eval.cost import peak_rss_mb
from ternlm.quantization import QuantizeConfig
from ternlm.streaming import stream_quantize
stream_quantize(sys.argv[3], sys.argv[4], QuantizeConfig(), progress=False)  # warm: lazy imports, kernels
before = peak_rss_mb()
stream_quantize(sys.argv[1], sys.argv[2], QuantizeConfig(), progress=False)
print(before, peak_rss_mb())
"""


def test_streaming_peak_memory_is_one_block(tmp_path):
    # 24 blocks of ~3 MB fp32: holding the model would add >= 72 MB to the peak, one block ~3 MB
    src = tiny_llama(tmp_path / "src", hidden=256, layers=24, inter=768, vocab=256, shard="10MB")
    warm = tiny_llama(tmp_path / "warm", layers=1)
    size_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    assert size_mb > 72
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / "st"), str(warm),
                        str(tmp_path / "warm-out")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(float, r.stdout.split()[-2:])
    assert after - before < size_mb / 4, (before, after, size_mb)


FIXTURE = Path(__file__).with_name("gpt_oss_20b_config.json")


def test_plan_of_gpt_oss_20b_is_honest():
    p = make_plan(FIXTURE)
    assert 20.5e9 < p.params < 21.5e9
    assert 18.5e9 < p.rows["experts"].params < 19.5e9
    assert 13e9 < p.bytes_now() < 14.5e9  # MXFP4 experts + bf16 rest, as published (~13 GB)
    emb = p.rows["embeddings"].after["2bit"] + p.rows["lm_head"].after["2bit"]
    assert 1.1e9 < emb < 1.2e9  # untied 201k x 2880 embeddings and head as int8 rows (the default)
    for fmt, lo, hi in (("2bit", 5.9e9, 7e9), ("base3", 4.8e9, 5.9e9)):
        assert lo < p.bytes_after(fmt) < hi, (fmt, p.bytes_after(fmt))  # not 1.5 GB
    from ternlm.quantization import QuantizeConfig

    f = make_plan(FIXTURE, QuantizeConfig(embed_dtype="float"))
    assert f.rows["embeddings"].after["2bit"] + f.rows["lm_head"].after["2bit"] > 2.2e9  # at fp16
    assert 7e9 < f.bytes_after("2bit") < 8e9
    assert "experts" in p.table() and "peak RAM" in p.table()


@pytest.mark.parametrize("fmt,gran", [("2bit", "per_tensor"), ("base3", "per_group")])
def test_plan_predicts_the_output_size(tmp_path, fmt, gran):
    src = tiny_llama(tmp_path / "src")
    cfg = QuantizeConfig(fmt=fmt, granularity=gran, group_size=32)
    p = make_plan(src, cfg)
    assert p.now_from == "headers"
    assert p.bytes_now() == sum(e.nbytes for e in SourceFiles(src).entries.values())
    out = stream_quantize(src, tmp_path / "o", cfg, progress=False)
    assert p.bytes_after(fmt) == sum(t.numel() * t.element_size() for t in tensors(out).values())


def test_cli_plan_and_quantize_resume(tmp_path, capsys):
    from ternlm.cli import main

    assert main(["plan", str(FIXTURE)]) == 0
    assert "experts" in capsys.readouterr().out
    src = tiny_llama(tmp_path / "src")
    assert main(["quantize", str(src), "--plan"]) == 0
    assert "expected peak RAM" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "o"), "--stream", "--resume", "--quiet"]) == 0
    assert "6 shards" in capsys.readouterr().out
    assert main(["quantize", str(src)]) == 2
    assert "--out" in capsys.readouterr().err
