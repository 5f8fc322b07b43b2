"""Moved to ``ternlm.bench.microbench`` (benchmarks live in ternlm.bench; kernels hold kernels).

``python -m ternlm.kernels.microbench`` still works, with a deprecation warning.
"""

import warnings

warnings.warn("ternlm.kernels.microbench moved to ternlm.bench.microbench", DeprecationWarning, stacklevel=2)

from ternlm.bench.microbench import *  # noqa: E402,F401,F403
from ternlm.bench.microbench import main  # noqa: E402

if __name__ == "__main__":
    main()
