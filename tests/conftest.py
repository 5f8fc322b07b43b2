"""Shared fixtures.

Tests that need the real data sets read them from TERNLM_DATA_DIR (default ../shared/data next to
the repository). They skip with a reason when it is absent -- unless TERNLM_REQUIRE_DATA=1 (set by
CI), which turns those skips into failures so CI never passes by skipping.
"""

import os
from pathlib import Path

# Triton kernels run in Triton's CPU interpreter here. It must be on before anything imports
# triton.language (bitsandbytes and transformers may, during collection), since triton's own
# library functions are decorated once, at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_sessionstart(session):
    """TERNLM_REQUIRE_KERNELS=1 (CI): a failed C++ build fails the run at once instead of every kernel
    test skipping or running the reference.

    NOTE: torch's first call of some vectorized elementwise ops (tanh, pow: GPT-2's GELU) returns a
    result that differs in the last bit in about one process in fifty (measured: the same tensor
    through NewGELUActivation twice, 1 of 60 fresh processes). Per-token int8 activations can turn that
    bit into a different rounding and the engine-equality tests into flakes, so every op the engines
    and models use is called once here first."""
    import torch

    x = torch.randn(64, 64)
    for op in (torch.tanh, torch.exp, torch.erf, torch.sigmoid, torch.rsqrt, torch.nn.functional.silu,
               torch.nn.functional.gelu, lambda t: torch.pow(t, 3.0), lambda t: torch.softmax(t, -1)):
        op(x)
    if os.environ.get("TERNLM_REQUIRE_KERNELS") == "1":
        from ternlm.errors import TernlmError
        from ternlm.kernels import _ext

        try:
            _ext.extension()
        except TernlmError as e:
            pytest.exit(f"{e} (build it: pip install -e . with a C++ compiler)", returncode=1)


def require_peer(module: str = "llama_cpp"):
    """The llama.cpp peer (llama-cpp-python); skip without it, or fail when TERNLM_REQUIRE_PEER=1 (CI)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("TERNLM_REQUIRE_PEER") == "1":
            pytest.fail(f"{module} not importable ({e}) and TERNLM_REQUIRE_PEER=1", pytrace=False)
        pytest.skip(f"could not import {module!r}: {e}")

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("TERNLM_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def require_data(*parts: str) -> Path:
    """Path to a file/dir under the data dir; skip (or fail in CI) when it is missing."""
    p = _data_dir().joinpath(*parts)
    if not p.exists():
        msg = f"real data not found at {p} (set TERNLM_DATA_DIR)"
        if os.environ.get("TERNLM_REQUIRE_DATA") == "1":
            pytest.fail(msg + " and TERNLM_REQUIRE_DATA=1", pytrace=False)
        pytest.skip(msg)
    return p


@pytest.fixture
def data_dir() -> Path:
    return require_data()


@pytest.fixture
def sms_path() -> Path:
    return require_data("sms_spam", "SMSSpamCollection")


@pytest.fixture
def wikitext_path() -> Path:
    return require_data("wikitext-2", "wiki.test.raw")


@pytest.fixture
def gpt2_tokenizer_dir() -> Path:
    return require_data("gpt2-tokenizer")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    d = require_data("gpt2-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=50257,
                      pad_token_id=50256)
