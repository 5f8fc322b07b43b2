"""ternlm distill on tiny GPT-2s: learning, resume, output, bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ternlm.train.distill as D
from ternlm.errors import TernlmError
from ternlm.models.loading import load, save_model
from ternlm.quantization import QuantizeConfig, quantize
from ternlm.nn.surgery import trainable_from_packed

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "A stitch in time saves nine. ") * 40
HELD = "Colourless green ideas sleep furiously while the night is young and the moon is bright. " * 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory, gpt2_tokenizer):
    """A small random GPT-2 teacher with peaked logits, and its per-group absmean PTQ student
    (group 96: one partial group per row for in=64, 96+96+64 for the MLP's in=256)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=50257, initializer_range=0.2)
    save_model(GPT2LMHeadModel(cfg), gpt2_tokenizer, d / "teacher")
    quantize(str(d / "teacher"), d / "student",
             QuantizeConfig(granularity="per_group", group_size=96, act_bits=None, float_dtype="fp32"))
    (d / "train.txt").write_text(TEXT)
    (d / "held.txt").write_text(HELD)
    return d


def _cfg(d: Path, out: str, **kw) -> D.DistillConfig:
    base = dict(teacher=str(d / "teacher"), student=str(d / "student"), texts=(str(d / "train.txt"),),
                out=str(d / out), eval_text=str(d / "held.txt"), steps=6, batch_size=2, block_size=32,
                eval_window=64, eval_windows=1, eval_every=3, save_every=3, lr=1e-2, warmup_steps=1,
                float_dtype="fp32", progress=False)
    base.update(kw)
    return D.DistillConfig(**base)


def _fixed_kd(d: Path, model) -> float:
    """KD loss of ``model`` against the teacher on fixed windows of the training text."""
    teacher, tok = load(str(d / "teacher"))
    ids = torch.tensor(tok(TEXT, verbose=False).input_ids[:128]).reshape(4, 32)
    with torch.no_grad():
        return D.kd_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0).item()


def test_prepared_student_starts_at_the_checkpoint(pair):
    from ternlm.nn.bitlinear import BitLinear
    from ternlm.nn.surgery import ternary_linears

    packed, tok = load(str(pair / "student"), kernel="reference")
    scales = {n: m.scale.clone() for n, m in ternary_linears(packed)}
    ids = torch.tensor(tok(TEXT, verbose=False).input_ids[:32])[None]
    with torch.no_grad():
        want = packed(input_ids=ids).logits
    student = trainable_from_packed(packed)
    bits = {n: m for n, m in student.named_modules() if isinstance(m, BitLinear)}
    assert sorted(bits) == sorted(scales)
    for n, m in bits.items():
        assert m.learned_scale and torch.equal(m.scale.detach(), scales[n])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, want, atol=1e-4)


def test_distill_lowers_kd_and_the_output_loads_verifies_and_generates(pair):
    from ternlm.nn.verify import verify

    before = _fixed_kd(pair, load(str(pair / "student"))[0])
    s = D.distill(_cfg(pair, "out", steps=10, eval_every=5, save_every=5))
    model, tok = load(s["out"])
    after = _fixed_kd(pair, model)
    assert after < 0.8 * before
    rep = verify(model)
    assert rep.ok and rep.totals()["ternary_share"] == 1.0
    ids = tok("The quick", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 4
    out = Path(s["out"])
    for f in ("README.md", "distill.json", "distill_log.jsonl", "distill_curve.png", "ternlm_quantization.json"):
        assert (out / f).is_file(), f
    rec = json.loads((out / "ternlm_quantization.json").read_text())
    assert rec["granularity"] == "per_group" and rec["group_size"] == 96 and rec["act_bits"] is None
    log = [json.loads(line) for line in (out / "distill_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))
    assert [r["tokens"] for r in log if "eval_ppl" in r] == [0, 320, 640]
    assert s["curve"][0][1] == s["start_ppl"] and s["final_ppl_packed"] == pytest.approx(s["curve"][-1][1], rel=1e-3)
    card = (out / "README.md").read_text()
    assert "library_name: ternlm" in card and "knowledge distillation" in card


def test_resume_after_a_kill_ends_where_an_unbroken_run_ends(pair, monkeypatch):
    D.distill(_cfg(pair, "full"))
    real_save, saves = D._save_state, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(D, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        D.distill(_cfg(pair, "resumed"))
    monkeypatch.setattr(D, "_save_state", real_save)
    assert saves == [1] and not (pair / "resumed").exists()
    with pytest.raises(TernlmError, match="pass --resume"):
        D.distill(_cfg(pair, "resumed"))
    D.distill(_cfg(pair, "resumed", resume=True, progress=True))
    a, b = load_file(str(pair / "full" / "model.safetensors")), load_file(str(pair / "resumed" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (pair / "full" / "distill_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (pair / "resumed" / "distill_log.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(la) == strip(lb)


def test_resume_with_a_different_config_names_the_keys(pair, monkeypatch):
    monkeypatch.setattr(D, "_save_state", _die_after(D._save_state))
    with pytest.raises(KeyboardInterrupt):
        D.distill(_cfg(pair, "other"))
    with pytest.raises(TernlmError, match=r"different config: lr .*temperature"):
        D.check_inputs(_cfg(pair, "other", resume=True, lr=5e-3, temperature=2.0, eval_every=2))
    D.check_inputs(_cfg(pair, "other", resume=True, eval_every=2))  # eval cadence may change


def _die_after(real):
    def f(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt
    return f


def test_continuous_steps_keep_the_codes_and_learn_the_scales(pair):
    s = D.distill(_cfg(pair, "cont", steps=3, continuous_steps=3, eval_text=None, save_every=10))
    a, b = load_file(str(pair / "student" / "model.safetensors")), load_file(str(Path(s["out"]) / "model.safetensors"))
    packed = [k for k in a if k.endswith(".packed")]
    assert packed and all(torch.equal(a[k], b[k]) for k in packed)
    assert any(not torch.equal(a[k.replace(".packed", ".scale")], b[k.replace(".packed", ".scale")]) for k in packed)
    assert s["teacher_ppl"] is None and s["curve"] == []


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(pair, monkeypatch):
    real, calls = D.kd_loss, []

    def kd(*a):
        calls.append(1)
        return real(*a) * (float("nan") if len(calls) > 4 else 1.0)

    monkeypatch.setattr(D, "kd_loss", kd)
    with pytest.raises(TernlmError, match=r"loss is nan at step 4;.*last good checkpoint \(step 3\)"):
        D.distill(_cfg(pair, "nan", save_every=3, eval_text=None))
    st = json.loads((pair / "nan.state" / "ckpt" / "state.json").read_text())
    assert st["step"] == 3 and not (pair / "nan").exists()


def test_bad_inputs_are_one_line_errors_before_models_load(pair, tmp_path, gpt2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(TernlmError, match="also a training text"):
        D.check_inputs(_cfg(pair, "x", eval_text=str(pair / "train.txt")))
    with pytest.raises(TernlmError, match="not a ternlm checkpoint"):
        D.check_inputs(_cfg(pair, "x", student=str(pair / "teacher")))
    with pytest.raises(TernlmError, match="no such training text"):
        D.check_inputs(_cfg(pair, "x", texts=(str(tmp_path / "nope.txt"),)))
    with pytest.raises(TernlmError, match="nothing to resume"):
        D.check_inputs(_cfg(pair, "x", resume=True))
    with pytest.raises(TernlmError, match="batch_size must be"):
        _cfg(pair, "x", batch_size=0)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(TernlmError, match=r"one batch needs at least 65 \(batch_size 2 x block_size 32 \+ 1\)"):
        D.distill(_cfg(pair, "x", texts=(str(tmp_path / "short.txt"),)))
    # a teacher of another architecture and vocabulary
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    save_model(llama, None, tmp_path / "llama")
    with pytest.raises(TernlmError, match="different architectures"):
        D.distill(_cfg(pair, "x", teacher=str(tmp_path / "llama")))
    teacher, _ = load(str(pair / "teacher"))
    student, _ = load(str(pair / "student"))
    teacher.config.vocab_size = 1000
    with pytest.raises(TernlmError, match="different vocabularies"):
        D.check_pair(teacher, student, None, None, False)


def test_cli_distill_and_errors(pair, capsys):
    from ternlm.cli import main

    rc = main(["distill", "--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--text",
               str(pair / "train.txt"), "--eval-text", str(pair / "held.txt"), "--eval-window", "64",
               "--eval-windows", "1", "-o", str(pair / "cli"), "--steps", "2", "--batch-size", "2",
               "--block-size", "32", "--float-dtype", "fp32", "--quiet"])
    assert rc == 0
    assert "2 steps, 128 tokens" in capsys.readouterr().out
    assert (pair / "cli" / "README.md").is_file()
    rc = main(["distill", "--teacher", str(pair / "teacher"), "--student", str(pair / "teacher"), "--text",
               str(pair / "train.txt"), "-o", str(pair / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ternlm: error:") and "not a ternlm checkpoint" in err
    assert len(err.strip().splitlines()) == 1


# ---- recovery data: weighted sources, token shards, the teacher's own text


def test_self_generated_corpus_is_deterministic_and_extends(pair, tmp_path):
    from ternlm.data.selfgen import SelfGenConfig, corpus_tokens, self_generate

    teacher, tok = load(str(pair / "teacher"))
    cfg = SelfGenConfig(tokens=5 * 24, length=24, batch=2, seed=3)
    a = corpus_tokens(self_generate(teacher, tok, cfg, tmp_path / "a", teacher="t", progress=False))
    b = corpus_tokens(self_generate(teacher, tok, SelfGenConfig(tokens=5 * 24, length=24, batch=2, seed=3),
                                    tmp_path / "b", teacher="t", progress=False))
    assert a.shape == (5 * 24,) and (a == b).all()  # same seed: the same corpus
    c = corpus_tokens(self_generate(teacher, tok, SelfGenConfig(tokens=5 * 24, length=24, batch=2, seed=4),
                                    tmp_path / "c", teacher="t", progress=False))
    assert not (a == c).all()
    seqs = a.reshape(5, 24)
    special = set(tok.all_special_ids)
    assert all(int(s[0]) not in special for s in seqs)  # first tokens drawn from the ordinary vocabulary
    with torch.no_grad():  # the greedy tokens after the first one are the teacher's argmax
        nxt = teacher(input_ids=torch.as_tensor(seqs[:, :1])).logits[:, -1].argmax(-1)
    assert (nxt.numpy() == seqs[:, 1]).all()
    # asking for more extends the cache (the first sequences unchanged), in a different batch size
    longer = corpus_tokens(self_generate(teacher, tok, SelfGenConfig(tokens=9 * 24, length=24, batch=4, seed=3),
                                         tmp_path / "a", teacher="t", progress=False))
    assert longer.shape == (9 * 24,) and (longer[: 5 * 24] == a).all()
    with pytest.raises(TernlmError, match="made with other settings"):
        self_generate(teacher, tok, SelfGenConfig(tokens=24, length=32, seed=3), tmp_path / "a", teacher="t",
                      progress=False)


def test_weighted_sources_shards_and_self_generated_text(pair, tmp_path):
    """Windows come from each source in proportion to its weight; a prepare-data shard directory
    and the self-generated corpus are sources like a text file; the summary says what was seen."""
    from ternlm.data.shards import PrepareConfig, prepare_data

    other = tmp_path / "other.txt"
    other.write_text("Zebras quietly graze beside tall acacia trees on the savanna. " * 60)
    prepare_data(PrepareConfig(sources=(str(other),), out=str(tmp_path / "shards"), tokenizer=str(pair / "teacher"),
                               progress=False))
    cfg = _cfg(pair, "mix", texts=(str(pair / "train.txt"), str(tmp_path / "shards")), text_weights=(0.75, 0.0, 0.25),
               self_generate=8 * 32, self_generate_length=32, eval_text=None, steps=2)
    teacher, tok = load(str(pair / "teacher"))
    from ternlm.data.selfgen import SelfGenConfig, self_generate

    sg = self_generate(teacher, tok, SelfGenConfig(tokens=8 * 32, length=32, seed=0), tmp_path / "sg", progress=False)
    mix, _ = D.load_tokens(tok, cfg, sg)
    zebra = set(tok(" Zebras quietly graze")["input_ids"])
    fox = set(tok(" quick brown fox jumps")["input_ids"])
    counts = {"fox": 0, "zebra": 0, "other": 0}
    for step in range(40):
        for row in mix.batch(cfg, step, 0).tolist():
            counts["fox" if fox & set(row) else "zebra" if zebra & set(row) else "other"] += 1
    assert counts["zebra"] == 0  # weight 0
    assert 0.6 < counts["fox"] / 80 < 0.9 and counts["other"] > 0
    assert torch.equal(mix.batch(cfg, 7, 0), mix.batch(cfg, 7, 0))  # a pure function of (seed, step)
    desc = mix.describe()
    assert [round(d["weight"], 2) for d in desc] == [0.75, 0.0, 0.25] and desc[2]["tokens"] == 8 * 32
    # end to end: the run makes the corpus in its state dir and records what it saw
    summary = D.distill(_cfg(pair, "mix-run", texts=(str(pair / "train.txt"),), self_generate=4 * 32,
                             self_generate_length=32, text_weights=(0.5, 0.5), eval_text=None, steps=2))
    assert [d["source"].startswith("self-generated") for d in summary["data"]] == [False, True]
    assert "training data (what this run saw)" in (Path(summary["out"]) / "README.md").read_text()
    with pytest.raises(TernlmError, match="2 text weights for 1 sources"):
        _cfg(pair, "x", text_weights=(1.0, 1.0))
    with pytest.raises(TernlmError, match="needs training text"):
        D.check_inputs(_cfg(pair, "x", texts=()))


def test_zeroshot_at_every_evaluation_point(pair, tmp_path):
    """--eval-tasks: the zero-shot average is logged at step 0 (teacher and student), at each
    evaluation point and for the packed output, and plotted beside the perplexity."""
    from tests.conftest import require_data

    tasks_dir = require_data("zeroshot")
    cfg = _cfg(pair, "zs_out", state_dir=str(tmp_path / "zs_state"), steps=4, eval_every=2, save_every=2,
               eval_tasks="piqa,arc_easy", eval_tasks_limit=3, eval_tasks_dir=str(tasks_dir))
    s = D.distill(cfg)
    log = D.read_log(tmp_path / "zs_state" / D.LOG_FILE)
    points = [r for r in log if r.get("eval_zeroshot") is not None]
    assert [r["step"] for r in points] == [0, 2, 4]
    assert all(0.0 <= r["eval_zeroshot"] <= 1.0 for r in points)
    assert 0.0 <= log[0]["teacher_zeroshot"] <= 1.0
    assert [t for t, _ in s["zeroshot_curve"]] == [r["tokens"] for r in points]
    assert 0.0 <= s["final_zeroshot_packed"] <= 1.0 and s["teacher_zeroshot"] == log[0]["teacher_zeroshot"]
    assert (Path(s["out"]) / "distill_curve.png").is_file()
    assert "zero-shot average, this checkpoint (packed)" in (Path(s["out"]) / "README.md").read_text()


def test_unknown_eval_task_fails_before_models_load(pair):
    with pytest.raises(TernlmError, match="unknown task"):
        _cfg(pair, "zs_bad", eval_tasks="piqa,nonsense")
