"""The bits budget: the solver meets its bits per weight and keeps the most sensitive layers; mixed
ternary / int8 checkpoints load, verify, generate through the engine and export."""

import json

import pytest
import torch

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.ptq.budget import int8_layer_bytes, layer_sensitivity, solve_budget
from ternlm.quant.pack import ternary_layer_bytes


def _tern(o, i):
    return ternary_layer_bytes(o, i, "2bit", "per_group", 64)


SHAPES = {f"l{k}": s for k, s in enumerate([(64, 64), (128, 64), (64, 128), (256, 64), (64, 256), (192, 64)])}


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0, 6.0, 9.0])
def test_solver_meets_the_budget_and_no_ternary_layer_would_still_fit(budget):
    sens = {k: float(i + 1) for i, k in enumerate(SHAPES)}
    keep, bpw, base = solve_budget(SHAPES, sens, budget, _tern)
    n = sum(o * i for o, i in SHAPES.values())
    bits = sum(8 * (int8_layer_bytes(*SHAPES[k]) if k in keep else _tern(*SHAPES[k])) for k in SHAPES)
    assert bpw == pytest.approx(bits / n) and bpw <= budget + 1e-9
    assert base == pytest.approx(2.5)  # 2-bit codes + a float32 scale per 64 weights
    room = budget * n - bits
    for k in set(SHAPES) - set(keep):  # maximal: no layer left ternary fits the bits that remain
        assert 8 * (int8_layer_bytes(*SHAPES[k]) - _tern(*SHAPES[k])) > room


def test_solver_keeps_the_most_sensitive_layers_per_bit():
    same = {k: (64, 64) for k in "abcd"}
    keep, _, _ = solve_budget(same, {"a": 0.1, "b": 5.0, "c": 0.5, "d": 2.0}, 5.5, _tern)
    assert keep == ["b", "d"]  # room for two of the four equal-sized layers: the two most sensitive
    # per bit: a small sensitive layer before a big one of a little more sensitivity
    keep, _, _ = solve_budget({"small": (64, 64), "big": (512, 64)}, {"small": 1.0, "big": 1.5}, 9.0, _tern)
    assert keep[0] == "small"
    with pytest.raises(TernlmError, match="below the all-ternary size of these layers \\(2.500"):
        solve_budget(same, {}, 2.0, _tern)


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    args = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=50256, eos_token_id=50256)
    args.update(kw)
    return LlamaForCausalLM(LlamaConfig(**args)).eval()


def test_a_layer_that_is_already_ternary_is_insensitive():
    from ternlm.quant.ternary import ternarize

    m = _llama()
    cfg = TernaryConfig(granularity="per_group", group_size=64, scale_mode="fit")  # fit: ternarizing is idempotent
    w = m.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_(ternarize(w.float(), cfg).dequantize())
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(m, ids, names, cfg, progress=False)
    assert sens[names[0]] < 1e-6 < sens[names[1]]
    assert torch.equal(m.model.layers[0].mlp.up_proj.weight, _llama().model.layers[0].mlp.up_proj.weight)  # restored


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, gpt2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ternlm.checkpoint import save_model
    from ternlm.quantization import QuantizeConfig, quantize

    d = tmp_path_factory.mktemp("budget")
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       bos_token_id=50256, eos_token_id=50256))
    save_model(src, gpt2_tokenizer, d / "src")
    (d / "calib.txt").write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 60)
    out = {}
    for method in ("absmean", "pt-bitnet"):
        out[method] = quantize(d / "src", d / method, QuantizeConfig(
            method=method, granularity="per_group", group_size=64, calib=str(d / "calib.txt"), calib_tokens=256,
            seq_len=64, reconstruct_steps=2, budget_bpw=4.0, budget_tokens=128), progress=False)
    return d, out


@pytest.mark.parametrize("method", ["absmean", "pt-bitnet"])
def test_budget_checkpoints_load_verify_generate_and_export(mixed, method, tmp_path):
    from ternlm import load
    from ternlm.nn.int8_linear import Int8RowLinear
    from ternlm.nn.verify import verify
    from ternlm.runtime import DecodeEngine, RuntimeConfig

    _, out = mixed
    ck = out[method]
    plan = json.loads((ck / "ternlm_budget.json").read_text())
    rec = json.loads((ck / "ternlm_quantization.json").read_text())
    assert plan["int8"] and plan["bpw"] <= 4.0 and rec["int8_layers"] == sorted(plan["int8"], key=rec["int8_layers"].index)
    assert set(rec["int8_layers"]) == set(plan["int8"]) and not set(rec["int8_layers"]) & set(rec["targets"])
    model, tok = load(ck)
    assert all(isinstance(model.get_submodule(n), Int8RowLinear) for n in rec["int8_layers"])
    rep = verify(model)
    t = rep.totals()
    assert rep.ok and 0 < t["ternary_share"] < 1  # the share of ternary weights, int8 ones counted apart
    assert t["ternary_share"] == pytest.approx(plan["ternary_share"])
    assert "kept by the bits budget" in rep.format()
    ids = tok("The quick brown fox", return_tensors="pt").input_ids[0]
    eng = DecodeEngine.from_checkpoint(ck, RuntimeConfig(max_seq_len=64))
    ref = DecodeEngine(model, RuntimeConfig(max_seq_len=64))
    assert eng.generate(ids, 8)["tokens"] == ref.generate(ids, 8)["tokens"]
    with torch.no_grad():  # the engine's prefill and the HF model agree
        assert torch.allclose(eng.logits(ids)[0], model(ids[None]).logits[0], atol=1e-3, rtol=1e-3)


def test_int8_layers_export_to_gguf_as_q8_0(tmp_path, gpt2_tokenizer):
    import gguf

    from ternlm.checkpoint import save_pretrained
    from ternlm.conversion import convert
    from ternlm.export.gguf import export_gguf, from_gguf
    from ternlm.nn.int8_linear import Int8RowLinear
    from ternlm.nn.surgery import replace_module

    m = _llama(hidden_size=256, intermediate_size=256)
    down = m.model.layers[1].mlp.down_proj
    kept = Int8RowLinear.from_module(down, 8)
    convert(m, fmt="2bit")
    replace_module(m, "model.layers.1.mlp.down_proj", kept)
    m.ternlm_targets = [t for t in m.ternlm_targets if t != "model.layers.1.mlp.down_proj"]
    ck = save_pretrained(m, gpt2_tokenizer, tmp_path / "ck")
    out = export_gguf(ck, tmp_path / "m.gguf", "tq2_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.TQ2_0
    back = from_gguf(out)
    assert isinstance(back.model.layers[1].mlp.down_proj, Int8RowLinear)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, m(ids).logits, atol=2e-2)


def test_budget_bad_input(tmp_path):
    from ternlm.quantization import QuantizeConfig

    with pytest.raises(TernlmError, match="--budget-bpw measures each layer's sensitivity on calibration text"):
        QuantizeConfig(budget_bpw=3.0)
    with pytest.raises(TernlmError, match="--budget-bpw must be > 0"):
        QuantizeConfig(budget_bpw=-1.0, calib="x")
