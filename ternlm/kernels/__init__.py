"""Fast CPU kernels for packed ternary weights, each with a pure-PyTorch reference twin.

Loaded lazily: importing ``ternlm.kernels`` compiles and imports nothing; the C extension
(``ternlm._C``) is imported on the first kernel call, with one warning if it must fall back.

    from ternlm.kernels import bind_linear, linear_a8, linear_a16, available_levels, use_level, set_num_threads

``bind_linear`` is the one entry point of the packed ternary kernels (the functional ops and
``TernaryLinear`` go through it); ``select_backend`` is the one device-dispatch decision.
"""

_LAZY = {
    "bind_linear": "ternlm.kernels.ops",
    "BoundLinear": "ternlm.kernels.ops",
    "bind_int8_linear": "ternlm.kernels.ops",
    "bind_float_rows": "ternlm.kernels.ops",
    "select_backend": "ternlm.kernels.ops",
    "check_group_size": "ternlm.kernels.ops",
    "attn_decode": "ternlm.kernels.ops",
    "attn_decode_batch": "ternlm.kernels.ops",
    "rope": "ternlm.kernels.reference",
    "pad_int8_rows": "ternlm.kernels.ops",
    "int8_row_stride": "ternlm.kernels.ops",
    "int8_linear": "ternlm.kernels.ops",
    "float_rows_linear": "ternlm.kernels.ops",
    "A16_GEMM_MIN_TOKENS": "ternlm.kernels.ops",
    "linear_a8": "ternlm.kernels.ops",
    "linear_a16": "ternlm.kernels.ops",
    "dequantize": "ternlm.kernels.ops",
    "a8_accumulators": "ternlm.kernels.ops",
    "quantize_activations": "ternlm.kernels.ops",
    "ternary_linear": "ternlm.kernels.ops",
    "available_levels": "ternlm.kernels._ext",
    "set_level": "ternlm.kernels._ext",
    "get_level": "ternlm.kernels._ext",
    "use_level": "ternlm.kernels._ext",
    "set_num_threads": "ternlm.kernels._ext",
    "get_num_threads": "ternlm.kernels._ext",
    "pin_num_threads": "ternlm.kernels._ext",
    "CompiledStep": "ternlm.kernels.ops",
    "is_available": "ternlm.kernels._ext",
    "disable_extension": "ternlm.kernels._ext",
}


from ternlm._lazy import lazy_exports  # noqa: E402

__getattr__, __all__ = lazy_exports("ternlm.kernels", _LAZY)

