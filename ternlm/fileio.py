"""Atomic writes: a file or directory appears complete or not at all, and what it replaces
survives until the new one is done."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ternlm.errors import TernlmError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | Path, **savefig_kw) -> Path:
    """Save a matplotlib figure atomically (temporary PNG beside ``path``, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, **savefig_kw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def check_output_dir(out_dir: str | Path) -> Path:
    """Refuse, before any work, an output path that cannot become a directory: an existing file, or
    a location whose nearest existing parent is not a writable directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TernlmError(f"output {out} exists and is not a directory")
    parent = out if out.exists() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TernlmError(f"cannot write to {out}: {parent} is not a writable directory")
    return out


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work, an output file path that cannot be written (a directory, or an
    unwritable parent)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise TernlmError(f"output {p} is a directory, not a file")
    check_output_dir(p.parent)
    return p


def atomic_dir(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` on a fresh directory beside ``out_dir``, then swap it in by rename;
    an existing ``out_dir`` is moved aside (same filesystem, a rename) and removed only after the
    new one is in place. Returns the resolved ``out_dir``."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise TernlmError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically; tensors, numpy scalars and paths are converted."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if hasattr(o, "tolist") and hasattr(o, "dim"):  # torch.Tensor
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
