"""Export converted ternary models to other runtimes' file formats (GGUF for llama.cpp)."""

_LAZY = {"export_gguf": "ternlm.export.gguf", "from_gguf": "ternlm.export.gguf"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ternlm.export' has no attribute {name!r}")


__all__ = sorted(_LAZY)
