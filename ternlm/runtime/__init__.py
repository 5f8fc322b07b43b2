"""The lean decode engine (GPT-2 and Llama-family models): static KV cache, prefill + minimal-overhead decode step, sampling.

    from ternlm.runtime import DecodeEngine, RuntimeConfig
    rt = DecodeEngine(converted_model, RuntimeConfig(head="int8"))   # GPT2Runtime is the same class
    rt.generate(prompt_ids, max_new_tokens=128)["tokens"]
"""

_LAZY = {
    "DecodeEngine": "ternlm.runtime.engine",
    "GPT2Runtime": "ternlm.runtime.engine",
    "RuntimeConfig": "ternlm.runtime.engine",
    "Arch": "ternlm.runtime.engine",
    "ARCHS": "ternlm.runtime.engine",
    "describe": "ternlm.runtime.engine",
    "HEADS": "ternlm.config",  # re-exported: the valid heads are defined once, in ternlm.config
}


from ternlm._lazy import lazy_exports  # noqa: E402

__getattr__, __all__ = lazy_exports("ternlm.runtime", _LAZY)

