"""llama-cpp-python's OpenAI server (``python -m llama_cpp.server ARGS``) with llama.cpp's extra CPU buffer
types off: their AMX weight repacking crashes (SIGSEGV in libggml-cpu) on the first evaluation on some
CPUs, this machine's Sapphire Rapids VM included, and ``llama_cpp.Llama`` has no argument for it.
scripts/load_test.py runs it under the llama.cpp peer's interpreter (.venv-llama)."""

import sys

import llama_cpp.llama_cpp as C

_default_params = C.llama_model_default_params


def _no_repack():
    p = _default_params()
    p.use_extra_bufts = False
    return p


C.llama_model_default_params = _no_repack

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    sys.argv[0] = "llama_cpp.server"
    main()
