import json

import pytest

from ternlm.errors import TernlmError
from ternlm.train.compare import CompareConfig, compare
from ternlm.train.energy import ENERGY_PJ, energy_per_token, linear_energy, weight_bytes

D, L, V = 256, 4, 4096


def _shapes(ternary: bool):
    rows = []
    for i in range(L):
        for name, (n_in, n_out) in {"c_attn": (D, 3 * D), "c_proj": (D, D), "c_fc": (D, 4 * D),
                                    "mlp.c_proj": (4 * D, D)}.items():
            rows.append({"name": f"transformer.h.{i}.{name}", "in": n_in, "out": n_out, "ternary": ternary})
    rows.append({"name": "lm_head", "in": D, "out": V, "ternary": False})
    return rows


SHAPE = {"model_type": "gpt2", "n_layer": L, "d_model": D, "vocab_size": V, "tied": True}


def test_energy_per_op_formulas():
    e = ENERGY_PJ["45nm"]
    assert linear_energy(10, 20, "fp16") == pytest.approx(200 * (1.1 + 0.4))
    assert linear_energy(10, 20, "fp32") == pytest.approx(200 * (3.7 + 0.9))
    assert linear_energy(10, 20, "w158a16") == pytest.approx(200 * 0.4 + 20 * 1.1)
    assert linear_energy(10, 20, "w158a8") == pytest.approx(200 * e["add"]["int8"] + 40 * 1.1 + 10 * 1.1)


@pytest.mark.parametrize("node", ["45nm", "7nm"])
def test_a16_saves_a_few_x_a8_tens_of_x(node):
    fp16 = energy_per_token(_shapes(False), SHAPE, "fp16", 128, node)["blocks"]
    a16 = energy_per_token(_shapes(True), SHAPE, "w158a16", 128, node)["blocks"]
    a8 = energy_per_token(_shapes(True), SHAPE, "w158a8", 128, node)["blocks"]
    assert 2 < fp16 / a16 < 5
    assert 10 < fp16 / a8 < 100
    # the full-precision head and attention are charged the same in every variant
    t16 = energy_per_token(_shapes(True), SHAPE, "w158a16", 128, node)
    t8 = energy_per_token(_shapes(True), SHAPE, "w158a8", 128, node)
    assert t16["total"] - t16["blocks"] == pytest.approx(t8["total"] - t8["blocks"])


def test_weight_bytes():
    n_block = sum(s["in"] * s["out"] for s in _shapes(True) if s["ternary"])
    n_params = n_block + V * D + 1000
    w = weight_bytes(_shapes(True), n_params)
    assert w["fp32"] == 4 * n_params and w["bf16"] == 2 * n_params
    assert w["2bit"] == n_block // 4 + 4 * 4 * L + 2 * (V * D + 1000)
    assert w["1.6bit"] < w["2bit"] < w["bf16"]
    assert "2bit" not in weight_bytes(_shapes(False), n_params)


def _run(tmp_path, name, variant, losses, step_s):
    d = tmp_path / name
    d.mkdir()
    log = [{"step": i + 1, "tokens": (i + 1) * 1000, "loss": l + 0.1, "val_loss": l} for i, l in enumerate(losses)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    summary = {"variant": variant, "label": variant, "config": {"seq_len": 128, "knowledge_tokens": 0},
               "n_params": 2_000_000, "tokens": len(losses) * 1000, "final_val_loss": losses[-1],
               "final_val_ppl": 2.718 ** losses[-1], "seconds_per_step": step_s,
               "linear_shapes": _shapes(variant != "fp"), "model_shape": SHAPE}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_compare_table_and_plot(tmp_path):
    fp = _run(tmp_path, "fp", "fp", [5.0, 4.0, 3.0], 1.0)
    a8 = _run(tmp_path, "a8", "w158a8", [5.5, 3.5, 2.9], 1.2)
    slow = _run(tmp_path, "a4", "w158a4", [5.9, 4.9, 3.6], 1.1)
    rep = compare(CompareConfig(runs=(str(fp), str(a8), str(slow)), out=str(tmp_path / "cmp")))
    rows = {r["variant"]: r for r in rep["rows"]}
    assert rows["fp"]["tokens_to_fp_loss"] == 3000 and rows["w158a8"]["tokens_to_fp_loss"] == 3000
    assert rows["w158a4"]["tokens_to_fp_loss"] is None
    assert rows["w158a8"]["step_time_vs_fp"] == pytest.approx(1.2)
    assert rows["w158a8"]["val_loss_vs_fp"] == pytest.approx(2.9 / 3.0)
    assert rows["w158a8"]["block_energy_saving_vs_fp16"] > 10
    assert "E_token" in rep["text"] and rep["text"].count("\n| ") == 3
    for f in ("compare.md", "compare.json", "compare.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0


def test_compare_refuses_non_runs(tmp_path):
    with pytest.raises(TernlmError, match="not a finished"):
        compare(CompareConfig(runs=(str(tmp_path),)))
    with pytest.raises(TernlmError, match="at least one"):
        CompareConfig(runs=())
