"""The CLI on bad input: one line on stderr, non-zero exit, no traceback."""

import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ternlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(p, needle):
    assert p.returncode != 0
    err = [l for l in p.stderr.strip().splitlines() if l.startswith("ternlm")]
    assert err and needle in err[-1], p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout


def test_missing_model_dir(tmp_path, sms_path):
    p = run("pipeline", "--model", str(tmp_path / "nope"), "--data", str(sms_path), "--quiet")
    assert_one_line_error(p, "error")


def test_dataset_of_wrong_format(tmp_path, gpt2_tokenizer_dir):
    bad = tmp_path / "bad.tsv"
    bad.write_text("this has no tab\nneither does this\n")
    p = run("pipeline", "--model", str(gpt2_tokenizer_dir), "--random-init", "--data", str(bad), "--quiet",
            "--out", str(tmp_path / "out"))
    assert_one_line_error(p, "no valid rows")


def test_empty_dataset(tmp_path, gpt2_tokenizer_dir):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    p = run("pipeline", "--model", str(gpt2_tokenizer_dir), "--random-init", "--data", str(empty), "--quiet",
            "--out", str(tmp_path / "out"))
    assert_one_line_error(p, "error")


def test_unknown_method():
    p = run("pipeline", "--baselines", "int8_absmax,int3_magic", "--quiet")
    assert_one_line_error(p, "int3_magic")


def test_unknown_granularity_is_one_line():
    p = run("verify", "x", "--granularity", "per_row")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_verify_exit_status(tmp_path, gpt2_tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    p = run("verify", str(tmp_path))
    assert p.returncode == 1 and "NOT TERNARY" in p.stdout
    p = run("verify", str(tmp_path), "--quantize", "--json", str(tmp_path / "v.json"))
    assert p.returncode == 0 and "all layers ternary" in p.stdout
    assert (tmp_path / "v.json").exists()


@pytest.mark.parametrize("args", [["--help"], ["pipeline", "--help"], ["verify", "--help"], ["pretrain", "--help"]])
def test_help(args):
    assert run(*args).returncode == 0
