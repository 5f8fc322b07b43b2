"""Training from scratch: variants, resume, DDP, bad input (tiny models, a few steps each)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ternlm.data.shards import write_shard
from ternlm.errors import TernlmError
from ternlm.fileio import save_json
from ternlm.train import scratch
from ternlm.train.scratch import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    base = rng.integers(1, VOCAB, size=48)
    toks = np.concatenate([np.roll(base, i % 5) for i in range(120)])  # learnable: repeated phrases
    write_shard(d / "train_000000.bin", toks[:4000], VOCAB)
    write_shard(d / "train_000001.bin", toks[4000:], VOCAB)
    write_shard(d / "val_000000.bin", toks[:600], VOCAB)
    save_json({"vocab_size": VOCAB, "eot_token_id": 0}, d / "meta.json")
    return d


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model_config="gpt2-tiny", seq_len=16, batch_size=4, micro_batch=2,
                steps=6, eval_every=3, eval_tokens=128, save_every=3, log_every=1, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("variant,arch,k", [("fp", "gpt2-tiny", 0), ("w158a16", "gpt2-tiny", 0),
                                            ("w158a8", "llama-tiny", 0), ("w158a4", "gpt2-tiny", 0),
                                            ("w158a16", "llama-tiny", 2)])
def test_every_variant_trains(data, tmp_path, variant, arch, k):
    s = train(_cfg(data, tmp_path / "r", variant=variant, model_config=arch, knowledge_tokens=k, steps=12,
                   eval_every=12), progress=False)
    rows = _log(tmp_path / "r")
    assert len(rows) == 12 and rows[-1]["tokens"] == 12 * 4 * 16
    assert np.mean([r["loss"] for r in rows[-3:]]) < rows[0]["loss"] - 0.3
    assert s["final_val_loss"] < np.log(VOCAB)
    assert (tmp_path / "r" / "model" / "config.json").is_file()
    assert ((tmp_path / "r" / "model" / "ternlm_knowledge.safetensors").is_file()) == bool(k)
    n_tern = sum(x["ternary"] for x in s["linear_shapes"])
    assert (n_tern > 0) == (variant != "fp")


def test_trained_ternary_model_converts_to_ternary(data, tmp_path):
    from ternlm.config import TernaryConfig
    from ternlm.conversion import convert
    from ternlm.models.loading import load
    from ternlm.nn.verify import verify

    train(_cfg(data, tmp_path / "r", variant="w158a8", steps=3), progress=False)
    model = load(tmp_path / "r" / "model", tokenizer=False).model
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ref = model(input_ids=x).logits  # float weights (the latent weights)
    # the QAT forward (BitLinear) and the packed model agree
    from ternlm.config import QuantConfig
    from ternlm.nn.surgery import quantize_model

    qat = load(tmp_path / "r" / "model", tokenizer=False).model
    quantize_model(qat, QuantConfig(weights=TernaryConfig(act_bits=8)))
    convert(model, TernaryConfig(act_bits=8), fmt="2bit", kernel="reference")
    assert verify(model).ok
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, qat(input_ids=x).logits, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(ref, qat(input_ids=x).logits)


def test_resume_equals_unbroken(data, tmp_path):
    train(_cfg(data, tmp_path / "a", variant="w158a8"), progress=False)
    cfg_b = _cfg(data, tmp_path / "b", variant="w158a8")
    assert train(cfg_b, progress=False, stop_after=4) == {"stopped_at": 4}  # killed after step 4
    assert torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    train(cfg_b, resume=True, progress=False)  # resumes from the step-3 checkpoint
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_equals_single_process(data, tmp_path):
    args = ["train", "--data", str(data), "--model-config", "gpt2-tiny", "--variant", "w158a16", "--seq-len", "16",
            "--batch-size", "4", "--micro-batch", "2", "--steps", "4", "--eval-every", "2", "--eval-tokens", "128",
            "--log-every", "1", "--lr", "3e-3", "--knowledge-tokens", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    single = subprocess.run([sys.executable, "-m", "ternlm.cli", *args, "-o", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ternlm.cli", *args,
                          "-o", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in two if "val_loss" in r],
                               [r["val_loss"] for r in one if "val_loss" in r], rtol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_global_batch_independent_of_micro_batch(data, tmp_path):
    train(_cfg(data, tmp_path / "a", steps=3, micro_batch=4), progress=False)
    train(_cfg(data, tmp_path / "b", steps=3, micro_batch=1), progress=False)
    np.testing.assert_allclose([r["loss"] for r in _log(tmp_path / "b")],
                               [r["loss"] for r in _log(tmp_path / "a")], rtol=1e-5)


def test_bad_input(data, tmp_path):
    with pytest.raises(TernlmError, match="unknown variant 'w2'; choose one of fp, w158a16, w158a8, w158a4"):
        _cfg(data, tmp_path / "x", variant="w2")
    with pytest.raises(TernlmError, match="unknown model config 'gpt9'; choose one of gpt2-tiny"):
        _cfg(data, tmp_path / "x", model_config="gpt9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TernlmError, match="meta.json|no train shards"):
        train(_cfg(tmp_path / "empty", tmp_path / "x"), progress=False)
    train(_cfg(data, tmp_path / "r", steps=2, eval_every=2), progress=False)
    with pytest.raises(TernlmError, match="already holds a run"):
        train(_cfg(data, tmp_path / "r", steps=2, eval_every=2), progress=False)
    with pytest.raises(TernlmError, match=r"different config \(lr, steps\)"):
        train(_cfg(data, tmp_path / "r", steps=3, lr=1e-2, eval_every=2), resume=True, progress=False)


def test_nan_loss_stops_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = scratch.lm_loss

    def flaky(model, xy, reduction="mean"):
        out = real(model, xy, reduction)
        if model.training:
            calls["n"] += 1
            if calls["n"] > 8:  # step 5 (2 micro-batches per step)
                return out * float("nan")
        return out

    monkeypatch.setattr(scratch, "lm_loss", flaky)
    with pytest.raises(TernlmError, match="at step 4: stopped; the last good checkpoint"):
        train(_cfg(data, tmp_path / "r", save_every=2), progress=False)
    state = torch.load(tmp_path / "r" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_cli_one_line_errors(data, tmp_path, capsys):
    from ternlm.cli import main

    assert main(["train", "--data", str(data), "--variant", "int3", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ternlm: error: unknown variant 'int3'") and err.count("\n") == 1


def test_quantize_a_training_run_keeps_its_activation_precision(data, tmp_path):
    """`ternlm quantize RUN_DIR` reads the run's model/ and packs it at the precision it was trained
    with (W1.58A16 here), unless --act-bits says otherwise; ternlm.from_pretrained still works, with a
    deprecation warning."""
    import json
    import warnings

    import ternlm
    from ternlm.quantization import QuantizeConfig, quantize

    train(_cfg(data, tmp_path / "r", variant="w158a16", steps=2), progress=False)
    out = quantize(tmp_path / "r", tmp_path / "q", progress=False)  # the run directory, not its model/
    rec = json.loads((out / "ternlm_quantization.json").read_text())
    assert rec["act_bits"] is None
    out8 = quantize(tmp_path / "r", tmp_path / "q8", QuantizeConfig(act_bits=8), progress=False)
    assert json.loads((out8 / "ternlm_quantization.json").read_text())["act_bits"] == 8
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = ternlm.from_pretrained(out)
    assert any(issubclass(x.category, DeprecationWarning) and "ternlm.load" in str(x.message) for x in w)
    assert {m.act_bits for _, m in __import__("ternlm.nn.surgery", fromlist=["x"]).ternary_linears(model)} == {None}
