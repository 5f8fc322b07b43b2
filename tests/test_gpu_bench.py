"""The GPU benchmark's plumbing on CPU: Triton's interpreter runs the kernels, the timers are replaced.

What runs on a GPU is the same code with DEVICE = "cuda" and real timers; here the shapes, the
arguments each part hands the kernels, and the checks' verdicts are exercised without one.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ternlm.bench import gpu_bench as gb  # noqa: E402
from ternlm.kernels import triton_kernels as tk  # noqa: E402


@pytest.fixture
def cpu_bench(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gb, "DEVICE", "cpu")
    monkeypatch.setattr(gb, "L2_FLUSH_BYTES", 0)
    ran = []

    def fake_graph(calls, replays=20):
        for c in calls:
            ran.append(c())
        return 1.0

    def fake_eager(fn):
        ran.append(fn())
        return 2.0

    monkeypatch.setattr(gb, "time_graph", fake_graph)
    monkeypatch.setattr(gb, "_eager", fake_eager)
    return ran


def test_random_packed_holds_only_ternary_codes():
    from ternlm.quant.pack import unpack

    p = gb.random_packed(5, 300, "cpu", torch.Generator().manual_seed(0))
    codes = unpack(p, (5, 300), "2bit")
    assert set(codes.unique().tolist()) == {-1, 0, 1} and gb._valid_bytes("cpu").numel() == 81


def test_check_passes_and_catches_a_wrong_kernel(cpu_bench, monkeypatch):
    rows = gb.check(shapes=[(1, 33, 300), (3, 9, 130)])
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert {r["case"] for r in rows} >= {"W2A8", "W2A16 float32", "W2A16 bfloat16", "W2A8 halves"}
    # a kernel one code off is reported, not passed
    real = tk.linear_a8_triton
    monkeypatch.setattr(tk, "linear_a8_triton", lambda *a, **k: real(*a, **k) + 1e-3)
    assert not any(r["ok"] for r in gb.check(shapes=[(1, 9, 130)]) if r["case"].startswith("W2A8"))


def test_sweep_and_tables_run_the_kernels(cpu_bench):
    rows = gb.sweep_gemv(40, 512, configs=[(4, 1, 1), (8, 2, 2)])
    assert sorted((r["kernel"], r["BLOCK_N"]) for r in rows) == [("rows", 8), ("split-K", 4), ("split-K", 8)]
    assert tk.tiles_are_default()
    rows = gb.bench_gemv(shapes=((24, 300),), batches=(1, 3))
    assert [r["M"] for r in rows] == [1, 3] and rows[0]["w2a8_graph_us"] == 1.0
    assert any(isinstance(t, torch.Tensor) and t.shape == (3, 24) for t in cpu_bench)
    r = gb.bench_decode_linears(layers=2, d=64, qkv=96, ff=80)
    bf16_bytes = 2 * 2 * (96 * 64 + 64 * 64 + 160 * 64 + 64 * 80)  # 2 layers, 2 bytes, 4 linears
    assert r["w2a8_step_ms"] > 0 and r["weight_GB_bf16"] == pytest.approx(bf16_bytes / 1e9)


def test_main_refuses_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the benchmark would run")
    with pytest.raises(SystemExit, match="CUDA"):
        gb.main(["--parts", "check"])
