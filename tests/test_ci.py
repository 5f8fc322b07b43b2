"""CI means it: the compiled kernels and the llama.cpp peer are required there, not skipped."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_requires_kernels_data_and_peer():
    run = (REPO / ".ci" / "run").read_text()
    for var in ("TERNLM_REQUIRE_DATA=1", "TERNLM_REQUIRE_KERNELS=1", "TERNLM_WITH_PEER=1", "TERNLM_REQUIRE_PEER=1"):
        assert f"export {var}" in run, var
    assert "bash scripts/test.sh" in run and "bash scripts/test.sh" in (REPO / "README.md").read_text()


def test_missing_kernels_are_an_error_when_required():
    """With TERNLM_REQUIRE_KERNELS=1 a missing extension is an error, not the reference fallback."""
    # a build that failed: the extension module is not importable
    code = "import sys; sys.modules['ternlm._C'] = None\nfrom ternlm.kernels import _ext; _ext.extension()"
    env = {**os.environ, "TERNLM_REQUIRE_KERNELS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "TERNLM_REQUIRE_KERNELS=1 forbids the reference fallback" in p.stderr
    env.pop("TERNLM_REQUIRE_KERNELS")
    p = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode != 0 and "Falling back to the pure-PyTorch reference" in p.stderr  # otherwise: one warning
