"""Plain-text corpora for perplexity and pre-training: a local file, a local directory or a hub dataset.

Also home of the small source helpers (``looks_like_hub_id``, ``read_text_file``) that the SMS
loader and model loading share, because every entry point accepts either a local path or a hub id.
"""

from __future__ import annotations

import re
from pathlib import Path

from ternlm.errors import TernlmError

# "gpt2", "wikitext", "openai-community/gpt2": at most one slash, no path-like prefix.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Names with these endings are files the user meant to point at, never repositories.
_FILE_SUFFIXES = {".txt", ".raw", ".csv", ".tsv", ".json", ".jsonl", ".gguf", ".safetensors", ".bin",
                  ".pt", ".parquet"}
_TEXT_SUFFIXES = (".txt", ".raw")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid"}


def looks_like_hub_id(source: str) -> bool:
    """True when ``source`` could be a Hugging Face Hub repo id rather than a local path."""
    s = str(source)
    if not s or len(s) > 96 or ".." in s or s.endswith((".", "-")):
        return False
    if Path(s).suffix.lower() in _FILE_SUFFIXES:
        return False
    return _HUB_ID.match(s) is not None


def check_source(source, what: str = "file") -> None:
    """Refuse, before any work, a source that is neither an existing local path nor a hub id."""
    if source is None or Path(str(source)).expanduser().exists():
        return
    if not looks_like_hub_id(str(source)):
        raise TernlmError(f"no such {what}: {source}")


def read_text_file(path: Path, *, legacy_encodings: bool = False) -> str:
    """Decode a file as text with newlines normalized to "\n", refusing binaries with a TernlmError.

    Newlines are normalized because the local WikiText-2 copy uses CRLF while the hub copy uses LF;
    GPT-2's BPE tokenizes the two differently, which would shift perplexities.
    ``legacy_encodings`` also accepts Windows-1252 / Latin-1 text (the widely shared Kaggle
    ``spam.csv`` is one of them), but only when it decodes to printable characters, so a compressed
    or binary file is still refused.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TernlmError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\x00" in raw[:8192]:
        raise TernlmError(f"{path} is a binary file, not text")
    text = None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        for encoding in ("cp1252", "latin-1") if legacy_encodings else ():
            try:
                candidate = raw.decode(encoding)
            except UnicodeDecodeError:
                continue
            controls = sum(1 for c in candidate if (c < " " and c not in "\t\n\r") or "\x7f" <= c < "\xa0")
            if controls <= 0.001 * len(candidate):
                text = candidate
            break
    if text is None:
        also = " (nor Windows-1252/Latin-1)" if legacy_encodings else ""
        raise TernlmError(f"{path} is not UTF-8 text{also}")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _pick_text_file(directory: Path, split: str) -> Path:
    """wiki.{split}.raw, else the directory's only .txt/.raw file; anything else is ambiguous."""
    wanted = _SPLIT_ALIASES.get(split, split)
    for name in (f"wiki.{split}.raw", f"wiki.{wanted}.raw"):
        if (directory / name).is_file():
            return directory / name
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    if not files:
        raise TernlmError(f"no .txt or .raw file in {directory}")
    names = ", ".join(p.name for p in files)
    raise TernlmError(f"cannot tell which file in {directory} holds split {split!r} ({names}): pass the file")


def _load_hub_text(source: str, config: str | None, split: str) -> str:
    from ternlm.hub import dataset_kwargs, hub_error

    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split, **dataset_kwargs())
    except Exception as e:  # network, auth and unknown-config errors all mean "use a local file"
        raise hub_error(source, "text dataset", e) from None
    column = "text" if "text" in ds.column_names else None
    if column is None:
        strings = [n for n, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
        if len(strings) != 1:
            raise TernlmError(f"{source!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
        column = strings[0]
    # NOTE: "\n\n".join is how the Hugging Face perplexity guide joins WikiText, so numbers compare.
    text = "\n\n".join(ds[column])
    if not text.strip():
        raise TernlmError(f"{source!r} split {split!r} is empty")
    return text


def load_text(source: str | Path = "wikitext", *, config: str | None = None, split: str = "test") -> str:
    """Load a text corpus as one string.

    source: a text file, a directory (``wiki.{split}.raw`` if present, else its single .txt/.raw file)
        or a hub dataset id. An existing local path always wins over a hub id of the same name.
    config: hub dataset config; None means ``wikitext-2-raw-v1`` for WikiText and none otherwise.
    split: hub split, and which ``wiki.{split}.raw`` to pick in a local directory.
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            path = _pick_text_file(path, split)
        text = read_text_file(path)
        if not text.strip():
            raise TernlmError(f"{path} is empty")
        return text
    if not looks_like_hub_id(str(source)):
        raise TernlmError(f"no such file or directory: {source}")
    if config is None and str(source).split("/")[-1] == "wikitext":
        config = "wikitext-2-raw-v1"
    return _load_hub_text(str(source), config, split)
