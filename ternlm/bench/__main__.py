"""``python -m ternlm.bench``: the same as ``ternlm bench``."""

import argparse

from ternlm.bench.config import add_arguments
from ternlm.bench.run import bench_main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ternlm.bench",
                                description="ternlm vs HF transformers vs llama.cpp decode benchmark")
    add_arguments(p)
    bench_main(p.parse_args(argv))


if __name__ == "__main__":
    main()
