"""Token shards in the modded-nanogpt format, and ``prepare_data`` that writes them from text.

One shard file::

    bytes 0..1023      header: 256 little-endian int32
                         [0] magic   20240520
                         [1] version 1 = uint16 tokens, 2 = uint32 tokens (vocabularies over 65,536)
                         [2] number of tokens in the file
                         [3..255] zero
    bytes 1024..       the tokens, little-endian uint16 (version 1) or uint32 (version 2)

A data directory holds ``train_000000.bin``, ``train_000001.bin``, ... and ``val_000000.bin``
beside ``meta.json`` (tokenizer, vocabulary size, end-of-text id, token counts). Version 1 files are
byte-for-byte what modded-nanogpt's ``_load_data_shard`` reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ternlm.errors import TernlmError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
META_FILE = "meta.json"
SPLITS = ("train", "val")


def version_for_vocab(vocab_size: int) -> int:
    return 1 if vocab_size <= 1 << 16 else 2


def write_shard(path: str | Path, tokens, vocab_size: int) -> Path:
    """Write one shard atomically; ``tokens`` is any 1-D integer array with values < vocab_size."""
    path = Path(path)
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise TernlmError(f"a shard holds a 1-D token array, got shape {toks.shape}")
    if toks.size and (int(toks.min()) < 0 or int(toks.max()) >= vocab_size):
        raise TernlmError(f"token ids must lie in [0, {vocab_size}), got [{int(toks.min())}, {int(toks.max())}]")
    version = version_for_vocab(vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, toks.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(toks.astype(VERSION_DTYPES[version]).tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | Path) -> tuple[int, int]:
    """(version, token count) of a shard, refusing foreign or truncated files in one line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise TernlmError(f"cannot read shard {path}: {e.strerror or e}") from None
    if len(raw) < HEADER_BYTES:
        raise TernlmError(f"{path} is not a token shard: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise TernlmError(f"{path} is not a token shard (magic {int(header[0])}, expected {MAGIC})")
    version, n = int(header[1]), int(header[2])
    if version not in VERSION_DTYPES:
        raise TernlmError(f"{path}: unsupported shard version {version} (this ternlm reads 1 and 2)")
    expected = HEADER_BYTES + n * VERSION_DTYPES[version].itemsize
    if n < 0 or size != expected:
        raise TernlmError(f"{path} is truncated or corrupt: header says {n:,} tokens ({expected:,} bytes), "
                          f"file has {size:,} bytes")
    return version, n


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one shard as a read-only memory map (uint16 or uint32)."""
    version, n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=VERSION_DTYPES[version])
    return np.memmap(path, dtype=VERSION_DTYPES[version], mode="r", offset=HEADER_BYTES, shape=(n,))


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    if split not in SPLITS:
        raise TernlmError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise TernlmError(f"data directory {d} does not exist (write one with 'ternlm prepare-data')")
    paths = sorted(d.glob(f"{split}_*.bin"))
    if not paths:
        raise TernlmError(f"no {split} shards ({split}_*.bin) in {d} (write them with 'ternlm prepare-data')")
    return paths


def read_meta(data_dir: str | Path) -> dict:
    p = Path(data_dir).expanduser() / META_FILE
    if not p.is_file():
        raise TernlmError(f"{p.parent} has no {META_FILE} (write the data with 'ternlm prepare-data')")
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise TernlmError(f"cannot read {p}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 2:
        raise TernlmError(f"{p} has no valid vocab_size")
    return meta


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """Every shard of a split, concatenated in file order (memory maps when there is one shard)."""
    arrays = [read_shard(p) for p in shard_paths(data_dir, split)]
    out = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    meta = read_meta(data_dir)
    if out.size and int(out.max()) >= meta["vocab_size"]:
        raise TernlmError(f"{data_dir}: {split} shards hold token ids >= vocab_size {meta['vocab_size']}")
    return out


def write_split(out_dir: Path, split: str, tokens: np.ndarray, vocab_size: int, shard_tokens: int) -> list[str]:
    names = []
    for i, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
        name = f"{split}_{i:06d}.bin"
        write_shard(out_dir / name, tokens[start:start + shard_tokens], vocab_size)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Text -> shards


@dataclass
class PrepareConfig:
    """What ``ternlm prepare-data`` does.

    sources: local text files, directories (every .txt/.raw file inside, sorted) or hub dataset ids;
        each file or dataset is one document, separated by the tokenizer's end-of-text token.
    val_fraction: the last fraction of every document's tokens goes to val, so both splits cover
        every source.
    """

    sources: tuple = ()
    out: str = "runs/data"
    tokenizer: str = "gpt2"
    val_fraction: float = 0.1
    shard_tokens: int = 100_000_000
    hub_split: str = "train"
    progress: bool = True

    def __post_init__(self):
        self.sources = tuple(str(s) for s in self.sources)
        if not self.sources:
            raise TernlmError("prepare-data needs at least one text source")
        if not 0.0 < self.val_fraction < 1.0:
            raise TernlmError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise TernlmError("shard_tokens must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


def _documents(source: str, hub_split: str) -> list[tuple[str, str]]:
    """(name, text) of each document in a source."""
    from ternlm.data.text import check_source, load_text, read_text_file

    check_source(source, "text file or directory")
    p = Path(source).expanduser()
    if p.is_file():
        return [(str(p), read_text_file(p))]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".raw"))
        if not files:
            raise TernlmError(f"no .txt or .raw files in {p}")
        return [(str(f), read_text_file(f)) for f in files]
    return [(source, load_text(source, split=hub_split))]


def _tokenizer(source: str):
    """A tokenizer-only directory (no model config) loads directly; anything else through the loader."""
    p = Path(source).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(p))
        except Exception as e:
            raise TernlmError(f"cannot load the tokenizer from {p}: {str(e).splitlines()[0][:160]}") from None
    from ternlm.models.sources import load_tokenizer

    return load_tokenizer(source)


def prepare_data(cfg: PrepareConfig) -> dict:
    """Tokenize the sources and write train/val shards plus meta.json into ``cfg.out`` (atomically)."""
    from tqdm.auto import tqdm

    from ternlm.fileio import atomic_dir, check_output_dir, save_json
    check_output_dir(cfg.out)
    docs = [d for s in cfg.sources for d in _documents(s, cfg.hub_split)]  # reads fail before tokenizer work
    tok = _tokenizer(cfg.tokenizer)
    eot = tok.eos_token_id
    if eot is None:
        raise TernlmError(f"tokenizer {cfg.tokenizer!r} has no end-of-text (eos) token to separate documents")
    vocab_size = len(tok)
    train, val = [], []
    for name, text in tqdm(docs, desc="tokenize", disable=not cfg.progress, dynamic_ncols=True):
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
        if ids.size < 4:
            raise TernlmError(f"{name} holds too little text ({ids.size} tokens)")
        cut = ids.size - max(1, int(round(ids.size * cfg.val_fraction)))
        # NOTE: every document starts with end-of-text, as in modded-nanogpt's FineWeb shards.
        train += [np.array([eot]), ids[:cut]]
        val += [np.array([eot]), ids[cut:]]
    train, val = np.concatenate(train), np.concatenate(val)
    meta = {"tokenizer": cfg.tokenizer, "vocab_size": vocab_size, "eot_token_id": int(eot),
            "shard_version": version_for_vocab(vocab_size), "train_tokens": int(train.size),
            "val_tokens": int(val.size), "documents": [n for n, _ in docs], "config": cfg.to_dict()}

    def write(tmp: Path) -> None:
        meta["train_shards"] = write_split(tmp, "train", train, vocab_size, cfg.shard_tokens)
        meta["val_shards"] = write_split(tmp, "val", val, vocab_size, cfg.shard_tokens)
        save_json(meta, tmp / META_FILE)
        tok.save_pretrained(tmp / "tokenizer")

    atomic_dir(cfg.out, write)
    return meta
