"""Moved to ``ternlm.bench.gpu_bench`` (benchmarks live in ternlm.bench; kernels hold kernels).

``python -m ternlm.kernels.gpu_bench`` still works, with a deprecation warning.
"""

import warnings

warnings.warn("ternlm.kernels.gpu_bench moved to ternlm.bench.gpu_bench", DeprecationWarning, stacklevel=2)

from ternlm.bench.gpu_bench import *  # noqa: E402,F401,F403
from ternlm.bench.gpu_bench import main  # noqa: E402

if __name__ == "__main__":
    main()
