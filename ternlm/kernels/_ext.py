"""Lazy access to the compiled kernels (``ternlm._C``), their dispatch level and thread count.

Nothing here runs at import: the extension is imported on the first kernel call. When it cannot
be imported (no compiler at install time, a non-matching build, or ``TERNLM_DISABLE_KERNELS=1``)
every op runs its pure-PyTorch reference instead, and ONE warning per process says so; with
``TERNLM_REQUIRE_KERNELS=1`` (set by CI) an extension that fails to import is an error instead (a
deliberate ``TERNLM_DISABLE_KERNELS=1`` / ``disable_extension()`` still falls back).
"""

from __future__ import annotations

import contextlib
import os
import warnings

from ternlm.errors import TernlmError

# Dispatch levels, slowest to fastest; the extension reports which ones this CPU can run.
LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_vnni": 3, "amx": 4}
_LEVEL_NAMES = {v: k for k, v in LEVELS.items()}

_state = {"tried": False, "mod": None, "reason": None, "warned": False,
          "disabled": os.environ.get("TERNLM_DISABLE_KERNELS") == "1"}
_forced_level: int = -1  # -1: the best level the CPU supports
_num_threads: int | None = None


def extension():
    """The compiled module, or None after warning (once per process) that the reference runs."""
    if not _state["tried"]:
        _state["tried"] = True
        if _state["disabled"]:
            _state["reason"] = "disabled (TERNLM_DISABLE_KERNELS=1 or disable_extension())"
        else:
            try:
                from ternlm import _C

                _state["mod"] = _C
            except ImportError as e:
                _state["reason"] = f"not importable ({e}); reinstall with a C++ compiler: pip install -e ."
    if _state["mod"] is None and not _state["disabled"] and os.environ.get("TERNLM_REQUIRE_KERNELS") == "1":
        raise TernlmError(f"ternlm compiled kernels unavailable: {_state['reason']}; TERNLM_REQUIRE_KERNELS=1 "
                          "forbids the reference fallback")
    if _state["mod"] is None and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"ternlm compiled kernels unavailable: {_state['reason']}. Falling back to the "
                      "pure-PyTorch reference kernels (correct, much slower).", RuntimeWarning, stacklevel=3)
    return _state["mod"]


def is_available() -> bool:
    return extension() is not None


def disable_extension(disabled: bool = True) -> None:
    """Force the reference fallback (``True``) or allow the compiled kernels again (``False``).

    The next kernel call re-resolves the extension; the fallback warning is issued again once.
    """
    _state.update(tried=False, mod=None, reason=None, warned=False, disabled=disabled)


def available_levels() -> list[str]:
    """Dispatch levels this CPU and build can run, slowest first (empty without the extension)."""
    mod = extension()
    return [] if mod is None else [_LEVEL_NAMES[i] for i in mod.levels()]


def set_level(name: str | None) -> None:
    """Force one dispatch level (``scalar``, ``avx2``, ``avx512``, ``avx512_vnni``, ``amx``); None = best."""
    global _forced_level
    if name is None:
        _forced_level = -1
        return
    if name not in LEVELS:
        raise TernlmError(f"unknown kernel level {name!r}; choose one of {', '.join(LEVELS)}")
    if name not in available_levels():
        raise TernlmError(f"kernel level {name!r} is not available here (have: {', '.join(available_levels())})")
    _forced_level = LEVELS[name]


def get_level() -> str | None:
    """The level kernels run at now (None without the extension)."""
    levels = available_levels()
    if not levels:
        return None
    return _LEVEL_NAMES[_forced_level] if _forced_level >= 0 else levels[-1]


@contextlib.contextmanager
def use_level(name: str | None):
    prev = _forced_level
    set_level(name)
    try:
        yield
    finally:
        globals()["_forced_level"] = prev


def level_id() -> int:
    return _forced_level


def set_num_threads(n: int | None) -> None:
    """Threads the kernels use; None follows torch.get_num_threads()."""
    global _num_threads
    if n is not None and n < 1:
        raise TernlmError(f"thread count must be >= 1, got {n}")
    _num_threads = n


@contextlib.contextmanager
def pin_num_threads():
    """Keep the kernels' thread count where it is now while torch's own count changes inside, and let the
    kernels' idle threads spin between calls there (decode loops run torch single-threaded: a thread that
    stays awake joins the next kernel at once). Outside, idle threads sleep at once, leaving the cores to
    torch's own parallel ops."""
    global _num_threads
    prev = _num_threads
    _num_threads = get_num_threads()
    mod = extension()
    spin = None if mod is None else mod.set_pool_spin(-1)
    try:
        yield _num_threads
    finally:
        _num_threads = prev
        if mod is not None:
            mod.set_pool_spin(spin)


def get_num_threads() -> int:
    if _num_threads is not None:
        return _num_threads
    import torch

    return torch.get_num_threads()
