"""Former home of the decode engine, kept so ``from ternlm.runtime.gpt2 import GPT2Runtime`` still works;
the engine (GPT-2 and Llama) lives in ``ternlm.runtime.engine``."""

from ternlm.runtime.engine import GPT2Runtime, RuntimeConfig  # noqa: F401

__all__ = ["GPT2Runtime", "RuntimeConfig"]
