"""Lean decode engines: static KV cache, prefill + minimal-overhead decode step, sampling.

    from ternlm.runtime import GPT2Runtime, RuntimeConfig
    rt = GPT2Runtime(converted_gpt2_model, RuntimeConfig(head="int8"))
    rt.generate(prompt_ids, max_new_tokens=128)["tokens"]
"""

_LAZY = {
    "GPT2Runtime": "ternlm.runtime.gpt2",
    "RuntimeConfig": "ternlm.runtime.gpt2",
    "HEADS": "ternlm.config",  # re-exported: the valid heads are defined once, in ternlm.config
}


from ternlm._lazy import lazy_exports  # noqa: E402

__getattr__, __all__ = lazy_exports("ternlm.runtime", _LAZY)

