"""Read safetensors checkpoints one tensor at a time, from their headers, without mapping them.

A safetensors file is ``u64 header length | JSON header | data``; the header gives every tensor's
dtype, shape and byte range. ``SourceFiles`` reads the headers of a single file or of the shards an
index names, checks each file is as long as its header says (a truncated shard is an error before
any work), and reads one tensor with ``readinto`` into a fresh buffer. Plain reads rather than a
memory map keep the process's resident memory at the tensors it holds: touched pages of a mapped
30 GB checkpoint would count against the peak.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ternlm.errors import TernlmError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype name -> (torch dtype, bytes per element); MXFP4 blocks/scales are U8
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str          # safetensors name, e.g. "BF16"
    shape: tuple
    start: int          # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, checked against the file's length."""
    path = Path(path)
    if not path.is_file():
        raise TernlmError(f"missing safetensors file {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} beyond the file's {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TernlmError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info.get("dtype")
        if dt not in DTYPES:
            raise TernlmError(f"{path}: tensor {name} has unsupported dtype {dt!r}")
        a, b = info["data_offsets"]
        e = TensorEntry(name, path, dt, tuple(info["shape"]), base + a, base + b)
        if e.nbytes != e.numel * DTYPES[dt][1]:
            raise TernlmError(f"{path}: tensor {name} spans {e.nbytes} bytes, its shape needs "
                              f"{e.numel * DTYPES[dt][1]}")
        if e.end > size:
            raise TernlmError(f"{path} is truncated: tensor {name} ends at byte {e.end}, the file has {size}")
        out[name] = e
    return out


def read_tensor(e: TensorEntry) -> torch.Tensor:
    """One tensor, read from disk into its own (writable, contiguous) buffer."""
    dtype, _ = DTYPES[e.dtype]
    buf = torch.empty(e.nbytes, dtype=torch.uint8)
    with open(e.file, "rb") as f:
        f.seek(e.start)
        got = f.readinto(memoryview(buf.numpy()))
    if got != e.nbytes:
        raise TernlmError(f"{e.file} is truncated: tensor {e.name} ends early")
    return buf.view(dtype).reshape(e.shape)


def read_rows(e: TensorEntry, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a tensor's first dimension, read alone."""
    dtype, size = DTYPES[e.dtype]
    row = e.numel // e.shape[0] * size if e.shape and e.shape[0] else 0
    buf = torch.empty((r1 - r0) * row, dtype=torch.uint8)
    with open(e.file, "rb") as f:
        f.seek(e.start + r0 * row)
        got = f.readinto(memoryview(buf.numpy()))
    if got != buf.numel():
        raise TernlmError(f"{e.file} is truncated: tensor {e.name} ends early")
    return buf.view(dtype).reshape(r1 - r0, *e.shape[1:])


class SourceFiles:
    """The safetensors of a model directory: ``model.safetensors`` or an index and its shards."""

    def __init__(self, directory: str | Path):
        d = Path(directory).expanduser()
        self.directory = d
        index = d / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TernlmError(f"cannot read {index}: {type(e).__name__}") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (d / f).is_file():
                    raise TernlmError(f"{index} names {f}, which does not exist")
        elif (d / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in d.glob("*.safetensors"))
            if not found:
                raise TernlmError(f"no safetensors weights in {d} (streaming reads safetensors; GGUF and .bin "
                                  f"sources go through the in-memory path)")
            weight_map, files = None, found
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            for name, e in read_header(d / f).items():
                if weight_map is not None and weight_map.get(name) not in (None, f):
                    continue
                self.entries[name] = e
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.entries))
            if missing:
                raise TernlmError(f"{index} maps {missing[0]} to {weight_map[missing[0]]}, which does not hold it")
        self.files = [d / f for f in files]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.entries[name])

    def get_cast(self, name: str, dtype: torch.dtype, chunk_bytes: int = 32 << 20) -> torch.Tensor:
        """A float tensor cast to ``dtype`` through float32, read in row chunks, so a large
        embedding never exists whole in its source precision (the cast is elementwise: the result
        equals ``t.float().to(dtype)`` bit for bit)."""
        e = self.entries[name]
        if len(e.shape) < 2 or e.nbytes <= chunk_bytes:
            return read_tensor(e).to(torch.float32).to(dtype)
        out = torch.empty(e.shape, dtype=dtype)
        for r0, rows in self.row_blocks(name, dtype, chunk_bytes):
            out[r0:r0 + rows.shape[0]] = rows
        return out

    def row_blocks(self, name: str, dtype: torch.dtype, chunk_bytes: int = 32 << 20):
        """``(first_row, rows)`` blocks of a tensor cast to ``dtype`` through float32, read from disk
        a block at a time: a large embedding is never whole in memory in any float precision."""
        e = self.entries[name]
        if len(e.shape) < 2 or e.nbytes <= chunk_bytes:
            yield 0, read_tensor(e).to(torch.float32).to(dtype)
            return
        step = max(1, chunk_bytes * e.shape[0] // e.nbytes)
        for r0 in range(0, e.shape[0], step):
            yield r0, read_rows(e, r0, min(e.shape[0], r0 + step)).to(torch.float32).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
