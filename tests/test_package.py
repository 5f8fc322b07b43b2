import subprocess
import sys

import ternlm


def test_import_is_light():
    # nothing heavy at import time: torch/transformers load on first use
    code = "import ternlm, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in ternlm.__all__:
        assert getattr(ternlm, name) is not None
