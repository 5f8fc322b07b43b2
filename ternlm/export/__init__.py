"""Export converted ternary models to other runtimes' file formats (GGUF for llama.cpp)."""

_LAZY = {"export_gguf": "ternlm.export.gguf", "from_gguf": "ternlm.export.gguf"}


from ternlm._lazy import lazy_exports  # noqa: E402

__getattr__, __all__ = lazy_exports("ternlm.export", _LAZY)

