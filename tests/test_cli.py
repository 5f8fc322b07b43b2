"""The CLI on bad input: one line on stderr, non-zero exit, no traceback."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import require_data


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ternlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(p, message):
    """Exactly one line on stderr, ``ternlm: error: <message>...``, a non-zero exit, nothing else."""
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"ternlm: error: {message}"), p.stderr
    assert "Traceback" not in p.stdout


def test_missing_model_dir(tmp_path, sms_path):
    p = run("pipeline", "--model", str(tmp_path / "nope"), "--data", str(sms_path), "--quiet",
            "--text", str(sms_path), "--out", str(tmp_path / "out"))
    assert_one_line_error(p, f"no such file or directory: {tmp_path / 'nope'}")


def test_dataset_of_wrong_format(tmp_path, gpt2_tokenizer_dir):
    bad = tmp_path / "bad.tsv"
    bad.write_text("this has no tab\nneither does this\n")
    p = run("pipeline", "--model", str(gpt2_tokenizer_dir), "--random-init", "--data", str(bad), "--quiet",
            "--out", str(tmp_path / "out"))
    assert_one_line_error(p, f"no valid rows in {bad} (2 malformed")


def test_empty_dataset(tmp_path, gpt2_tokenizer_dir):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    p = run("pipeline", "--model", str(gpt2_tokenizer_dir), "--random-init", "--data", str(empty), "--quiet",
            "--out", str(tmp_path / "out"))
    assert_one_line_error(p, f"no valid rows in {empty} (0 malformed")


def test_unknown_method():
    p = run("pipeline", "--baselines", "int8_absmax,int3_magic", "--quiet")
    assert_one_line_error(p, "unknown baseline method 'int3_magic'; choose from int8_absmax, int8_zeropoint, llm_int8")


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


@pytest.mark.parametrize("command", ["pipeline", "verify", "pretrain", "quantize", "export", "bench", "generate",
                                     "eval"])
def test_help(command, capsys):
    from ternlm.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ternlm {command}")


def test_cli_defaults_are_the_configs():
    """Every default the CLI shows comes from the library's config dataclasses."""
    from ternlm.cli import build_parser
    from ternlm.config import TernaryConfig
    from ternlm.eval.perplexity import EvalConfig
    from ternlm.generate import GenerateConfig
    from ternlm.pipeline import PipelineConfig
    from ternlm.quantization import QuantizeConfig

    p = build_parser()
    a = p.parse_args(["pipeline"])
    assert (a.epochs, a.qat_lr, a.ppl_windows, a.granularity, a.act_bits) == (
        PipelineConfig.epochs, PipelineConfig.qat_lr, PipelineConfig.ppl_windows, TernaryConfig.granularity,
        TernaryConfig.act_bits)
    a = p.parse_args(["quantize", "m", "-o", "o"])
    assert (a.format, a.act_bits, a.float_dtype, a.method) == (QuantizeConfig.fmt, QuantizeConfig.act_bits,
                                                               QuantizeConfig.float_dtype, QuantizeConfig.method)
    a = p.parse_args(["generate", "--model", "m", "--prompt", "p"])
    assert (a.max_new_tokens, a.head, a.engine) == (GenerateConfig.max_new_tokens, GenerateConfig.head,
                                                    GenerateConfig.engine)
    a = p.parse_args(["eval", "m", "--text", "t"])
    assert (a.window, a.stride, a.max_windows) == (EvalConfig.window, EvalConfig.stride, EvalConfig.max_windows)


def test_pipeline_bad_data_is_one_line_before_any_model_loads(tmp_path):
    """The new-user case: a real model dir and a missing data file -> one line, exit 2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(tmp_path / "m")
    p = run("pipeline", "--model", str(tmp_path / "m"), "--data", "/nonexistent.tsv")
    assert p.returncode == 2
    assert_one_line_error(p, "no such data file: /nonexistent.tsv")


def test_hub_id_offline_fails_fast_with_advice(tmp_path):
    (tmp_path / "t.txt").write_text("some text to score")
    p = subprocess.run([sys.executable, "-m", "ternlm.cli", "eval", "gpt2", "--text", str(tmp_path / "t.txt")],
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                          "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(p, "could not load")
    assert "pass a local path instead" in p.stderr


# ---- quantize -> generate -> export: the inference workflow a user runs


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small GPT-2 HF directory with the real tokenizer (n_embd 256: TQ blocks need multiples of 256)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("hf")
    tok_dir = require_data("gpt2-tokenizer")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=128)).save_pretrained(d)
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(d)
    return d


def cli(capfd, *args):
    """Run the CLI in this process (fast); (exit status, stdout, stderr)."""
    from ternlm.cli import main

    capfd.readouterr()
    rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_cli_error(res, message):
    """One line on stderr, ``ternlm: error: `` then ``message`` (a prefix of the rest), non-zero exit."""
    rc, out, err = res
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ternlm: error: {message}"), err
    assert "Traceback" not in err + out


def test_quantize_generate_export(hf_dir, tmp_path, capfd):
    from safetensors import safe_open

    ck = tmp_path / "ck"
    rc, out, err = cli(capfd, "quantize", hf_dir, "-o", ck, "--format", "base3", "--act-bits", "16")
    assert rc == 0, err
    assert "8 ternary layers" in out and "base3" in out
    rec = __import__("json").loads((ck / "ternlm_quantization.json").read_text())
    assert rec["fmt"] == "base3" and rec["act_bits"] is None
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.h.0.attn.c_attn.packed").dtype.is_floating_point is False
        assert f.get_tensor("transformer.wte.qweight").dtype == torch.int8  # --embed-dtype default: int8 rows
        assert f.get_tensor("transformer.wte.scale").dtype == torch.float32
        assert str(f.get_tensor("transformer.h.0.ln_1.weight").dtype) == "torch.float16"  # --float-dtype default
    assert rec["embedding"] == "int8" and rec["format_version"] == 2

    outs = {}
    for engine in ("fast", "hf"):
        rc, out, err = cli(capfd, "generate", "--model", ck, "--prompt", "Hello there", "--max-new-tokens", "8",
                           "--engine", engine)
        assert rc == 0, err
        assert f"[{engine} engine; 8 tokens" in err and "tok/s" in err
        outs[engine] = out
    assert outs["fast"] == outs["hf"]  # same greedy continuation on both engines

    rc, out, err = cli(capfd, "export", ck, "--type", "tq1_0", "-o", tmp_path / "m.gguf")
    assert rc == 0, err
    size = (tmp_path / "m.gguf").stat().st_size
    assert size > 0
    # the GGUF gets its own model card: llama.cpp usage first, sizes read from the file
    card = (tmp_path / "README.md").read_text()
    assert "llama-cli -m m.gguf " in card and "- gguf" in card and "TQ1_0" in card
    assert f"| file size (MB) | {round(size / 1e6, 2):.4g} |" in card and "| 1.688 |" in card
    assert f"and its model card {tmp_path / 'README.md'}" in out
    # exported into the checkpoint directory: the checkpoint's own card is kept, the GGUF's goes beside it
    before = (ck / "README.md").read_text()
    rc, out, err = cli(capfd, "export", ck, "-o", ck / "m.gguf")
    assert rc == 0, err
    assert (ck / "README.md").read_text() == before
    assert "llama-cli -m m.gguf " in (ck / "m.README.md").read_text() and "TQ2_0" in (ck / "m.README.md").read_text()


def test_inference_commands_on_bad_input(hf_dir, tmp_path, capfd):
    assert_cli_error(cli(capfd, "quantize", tmp_path / "nope", "-o", tmp_path / "o"),
                     f"no such file or directory: {tmp_path / 'nope'}")
    (tmp_path / "afile").write_text("x")
    assert_cli_error(cli(capfd, "quantize", hf_dir, "-o", tmp_path / "afile"),
                     f"output {tmp_path / 'afile'} exists and is not a directory")
    ck = tmp_path / "ck"
    assert cli(capfd, "quantize", hf_dir, "-o", ck)[0] == 0
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated
    assert_cli_error(cli(capfd, "generate", "--model", ck, "--prompt", "Hi"), f"{w} is corrupt or truncated")
    assert_cli_error(cli(capfd, "export", ck, "-o", tmp_path / "x.gguf"), f"{w} is corrupt or truncated")
    assert not (tmp_path / "x.gguf").exists()
    assert_cli_error(cli(capfd, "export", hf_dir, "-o", tmp_path / "x.gguf"), f"{hf_dir} is not a ternlm checkpoint")
    assert_cli_error(cli(capfd, "generate", "--model", hf_dir, "--prompt", "Hi", "--head", "int8", "--engine", "hf"),
                     "--head applies to the fast engine only")
    assert_cli_error(cli(capfd, "eval", hf_dir, "--text", tmp_path / "none.txt"),
                     f"no such text file: {tmp_path / 'none.txt'}")
    assert_cli_error(cli(capfd, "eval", hf_dir, "--text", hf_dir / "config.json", "--json", tmp_path),
                     f"output {tmp_path} is a directory, not a file")
    assert_cli_error(cli(capfd, "eval", hf_dir, "--text", hf_dir / "config.json", "--window", "64", "--stride", "65"),
                     "stride (65) > window (64) would skip tokens")
    # and as a real process: one line on stderr, exit status 2, no traceback
    assert_one_line_error(run("generate", "--model", str(ck), "--prompt", "Hi"), f"{w} is corrupt or truncated")


def test_every_commands_quiet_silences_transformers_too(monkeypatch):
    """--quiet on any command (distill loading a GGUF teacher, eval, quantize...) switches transformers'
    own progress bars off for the command's run and back on after it; without it they stay on."""
    from transformers.utils import logging as hf_logging

    from ternlm import cli

    seen = []
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():
        action.set_defaults(fn=lambda a: seen.append(hf_logging.is_progress_bar_enabled()) or 0)
    assert cli.main(["distill", "--teacher", "t", "--student", "s", "--text", "x", "-o", "o", "--quiet"]) == 0
    assert cli.main(["eval", "m", "--quiet"]) == 0
    assert cli.main(["eval", "m"]) == 0
    assert seen == [False, False, True]
    assert hf_logging.is_progress_bar_enabled()
