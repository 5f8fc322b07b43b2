"""The Hugging Face Hub, asked once: is it reachable? Offline machines fail in seconds.

Without network, ``from_pretrained`` and ``load_dataset`` retry with back-off for half a minute
before giving up. Every hub load in ternlm calls ``require_hub`` first: one short TCP connect to
the endpoint (cached for the process), honouring ``HF_HUB_OFFLINE``. When the hub cannot be
reached, the load runs from the local cache only (``local_files_only``) and fails at once when
the files are not there.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from ternlm.errors import TernlmError

PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when the hub endpoint accepts a TCP connection (HF_HUB_OFFLINE=1: False)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_kwargs() -> dict:
    """Extra from_pretrained / load_dataset arguments: cache only when the hub is unreachable."""
    return {} if hub_reachable() else {"local_files_only": True}


def dataset_kwargs() -> dict:
    """Extra ``datasets.load_dataset`` arguments: cache only when the hub is unreachable."""
    if hub_reachable():
        return {}
    import datasets

    return {"download_config": datasets.DownloadConfig(local_files_only=True)}


def hub_error(ref: str, what: str, e: BaseException | None = None, example: str | None = None) -> TernlmError:
    """The one message for a failed hub load: says to pass a local path (``example``: such as what)."""
    where = "the Hugging Face Hub" if hub_reachable() else "the Hugging Face Hub (unreachable: offline?)"
    eg = f" (e.g. {example})" if example else ""
    why = f" [{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}]" if e is not None and str(e).strip() else ""
    return TernlmError(f"could not load {what} {ref!r} from {where}: pass a local path{eg} instead{why}")
