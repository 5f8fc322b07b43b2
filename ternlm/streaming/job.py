"""The machinery of a streaming quantization run: the output layout worked out on the meta device,
the source reader, the partial directory with its progress file, and the finished directory swapped
in by rename. ``streaming.quantize`` (absmean) and ``streaming.ptbitnet`` both run on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ternlm.errors import TernlmError
from ternlm.streaming.files import INDEX_FILE, SourceFiles

PROGRESS_FILE = "ternlm_progress.json"
INCOMPLETE = "INCOMPLETE"


def partial_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser().resolve()
    return out.parent / f".{out.name}.partial"


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def layout(config, cfg) -> dict:
    """What the in-memory path would produce, worked out on the meta device.

    Returns dict(model=float meta model, packed=packed meta model, rec=quantization record,
    targets, conv1d (targets stored (in, out)), experts (ternary expert modules), tied, stacks).
    """
    from dataclasses import replace

    from ternlm import __version__
    from ternlm.checkpoint import FORMAT_VERSION, empty_model, tied_names
    from ternlm.config import QuantConfig
    from ternlm.moe.experts import expert_modules
    from ternlm.nn.bitlinear import conv1d_class
    from ternlm.nn.surgery import select_targets

    from ternlm.streaming.plan import meta_model

    model = meta_model(config)
    if cfg.method == "pt-bitnet":  # every block linear, fitted group scales (what ptbitnet_quantize records)
        from ternlm.ptq.quantize import ptbitnet_quant_config

        qc = ptbitnet_quant_config(cfg.ptbitnet())
        tcfg = qc.weights
    else:
        tcfg = replace(cfg.ternary(), act_bits=cfg.act_bits)
        qc = QuantConfig(weights=tcfg, include=cfg.include, exclude=cfg.exclude)
    targets = select_targets(model, qc)
    experts = expert_modules(model)
    if not targets and not experts:
        raise TernlmError(f"no linear layers to convert in {type(model).__name__}")
    conv = conv1d_class()
    conv1d = {n for n in targets if conv is not None and isinstance(model.get_submodule(n), conv)}
    rec = {"format_version": FORMAT_VERSION, "method": "ternary", "granularity": tcfg.granularity,
           "group_size": tcfg.group_size, "fmt": cfg.fmt, "act_bits": cfg.act_bits, "targets": targets,
           "quant_config": qc.to_dict(), "ternlm_version": __version__}
    if experts:
        rec["experts"] = experts
    packed = empty_model(config, rec)
    tied = tied_names(packed)
    rows = []  # embedding / untied head written as int8 rows (what save_pretrained's embed_dtype="int8" writes)
    if getattr(cfg, "embed_dtype", "float") == "int8":
        from ternlm.checkpoint import FORMAT_VERSION_ROWS, embedding_names

        names = packed.state_dict()
        rows = [n for n in embedding_names(packed) if n is not None and f"{n}.weight" in names
                and f"{n}.weight" not in tied and names[f"{n}.weight"].dim() == 2]
        if rows:
            rec.update(format_version=FORMAT_VERSION_ROWS, embedding="int8")
    return dict(model=model, packed=packed, rec=rec, tcfg=tcfg, targets=targets, conv1d=conv1d,
                experts=experts, tied=tied, rows=rows)


def _units(keys: list[str]) -> dict[str, list[str]]:
    """Output tensor names grouped by transformer block (``...layers.7.``), the rest last."""
    units: dict[str, list[str]] = {}
    rest = []
    for k in keys:
        m = re.match(r"^(.*?\.\d+)\.", k)
        if m:
            units.setdefault(m.group(1), []).append(k)
        else:  # each tensor outside the blocks on its own: an embedding can outweigh a block
            rest.append(k)
    order = sorted(units, key=lambda u: (u.rsplit(".", 1)[0], int(u.rsplit(".", 1)[1])))
    return {**{u: units[u] for u in order}, **{k: [k] for k in rest}}


class _Reader:
    """Source tensors by model name; HF checkpoints sometimes omit the base-model prefix."""

    def __init__(self, files: SourceFiles, prefix: str):
        self.files, self.prefix = files, prefix

    def name(self, k: str) -> str | None:
        if k in self.files:
            return k
        if self.prefix and k.startswith(self.prefix + ".") and k[len(self.prefix) + 1:] in self.files:
            return k[len(self.prefix) + 1:]
        return None

    def has(self, k: str) -> bool:
        return self.name(k) is not None

    def get_cast(self, k: str, dtype: torch.dtype) -> torch.Tensor:
        return self.files.get_cast(self.name(k), dtype)

    def get_as(self, k: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``k``: cast to ``dtype`` when it is a float tensor, as stored otherwise."""
        if self.files.entries[self.name(k)].dtype in ("F64", "F32", "F16", "BF16"):
            return self.get_cast(k, dtype)
        return self.get(k)

    def row_blocks(self, k: str, dtype: torch.dtype):
        """``(first_row, rows)`` blocks of the float tensor ``k`` cast to ``dtype``, read a block at a
        time where the source can (safetensors; a GGUF tensor comes as one block)."""
        return self.files.row_blocks(self.name(k), dtype)

    def get(self, k: str) -> torch.Tensor:
        n = self.name(k)
        if n is None:
            raise TernlmError(f"tensor {k} is not in the source files of {self.files.directory}")
        return self.files.get(n)


def _convert_unit(keys: list[str], lay: dict, reader: _Reader, cfg) -> dict[str, torch.Tensor]:
    """The output tensors of one unit, exactly as convert + save_pretrained would write them."""
    from ternlm.checkpoint import TORCH_DTYPES
    from ternlm.moe.experts import convert_expert_tensors
    from ternlm.quant.pack import pack
    from ternlm.quant.ternary import ternarize

    from ternlm.nn.embedding import quantize_row_blocks

    targets, experts, rows = set(lay["targets"]), set(lay["experts"]), set(lay.get("rows", ()))
    want = TORCH_DTYPES[cfg.float_dtype]
    out: dict[str, torch.Tensor] = {}
    done_modules = set()
    for k in keys:
        module, _, leaf = k.rpartition(".")
        if module in rows and leaf == "weight":
            # the table never whole in float32: int8 rows from blocks of rows read off disk
            shape = tuple(lay["packed"].get_submodule(module).weight.shape)
            out[module + ".qweight"], out[module + ".scale"] = quantize_row_blocks(shape,
                                                                                   reader.row_blocks(k, torch.float32))
            continue
        if module in targets:
            if module in done_modules:
                continue
            done_modules.add(module)
            w = reader.get(module + ".weight").to(torch.float32)
            if module in lay["conv1d"]:
                w = w.t()
            t = ternarize(w, lay["tcfg"])
            del w
            out[module + ".packed"] = pack(t.codes, cfg.fmt)
            out[module + ".scale"] = t.scale.detach().float().contiguous()
            if module + ".bias" in keys:
                out[module + ".bias"] = reader.get(module + ".bias").float().contiguous()
            continue
        if module in experts:
            if module in done_modules:
                continue
            done_modules.add(module)
            out.update(convert_expert_tensors(module, reader, lay, cfg))
            continue
        out[k] = reader.get_as(k, want).contiguous()
    missing = sorted(set(keys) - set(out) - {f"{m}.weight" for m in rows})
    if missing:
        raise TernlmError(f"internal: unit left {missing[0]} unwritten")
    return out


def _fingerprint(files: SourceFiles, cfg, rec: dict, extra: bytes = b"") -> str:
    h = hashlib.sha256(extra)
    for name, e in sorted(files.entries.items()):
        h.update(f"{name}|{e.file.name}|{e.dtype}|{e.shape}|{e.start}|{e.end}|{e.file.stat().st_size}\n".encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps({k: v for k, v in rec.items() if k != "ternlm_version"}, sort_keys=True).encode())
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    from ternlm.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class Job:
    """One streaming quantization: the checked source, the output layout, the partial directory.

    Everything that can be checked is checked in the constructor, before any work: the source's
    headers and shard lengths, that every tensor the output needs is readable, the free disk.
    """

    def __init__(self, source: str | Path, out_dir: str | Path, cfg, *, check_disk: bool = True,
                 gguf_file: str | None = None):
        from transformers import AutoConfig

        from ternlm.fileio import check_output_dir
        from ternlm.models.sources import resolve_source

        s = resolve_source(source, gguf_file)
        src = Path(s.ref).expanduser()
        if not s.local or not src.is_dir():
            raise TernlmError(f"streaming quantization reads a local model directory or GGUF file; {source} is not one")
        self.src, self.cfg, self.gguf_file = src, cfg, s.gguf_file
        self.out = check_output_dir(out_dir).resolve()
        try:
            config = AutoConfig.from_pretrained(str(src), **({"gguf_file": s.gguf_file} if s.gguf_file else {}))
        except Exception as e:
            if s.gguf_file:
                raise TernlmError(f"cannot read {src / s.gguf_file} (truncated or corrupt GGUF?): "
                                  f"{type(e).__name__}") from None
            raise TernlmError(f"cannot read the model config in {src}: {type(e).__name__}") from None
        self.lay = lay = layout(config, cfg)  # the meta model: nothing allocated
        if s.gguf_file:
            from ternlm.streaming.gguf_source import GGUFFiles

            self.files = GGUFFiles(src / s.gguf_file, lay["model"])  # names mapped onto the model's
        else:
            self.files = SourceFiles(src)  # every header read and checked: truncated shards fail here
        self.rec = lay["rec"]
        self.reader = _Reader(self.files, getattr(lay["model"], "base_model_prefix", ""))
        expected = lay["packed"].state_dict()
        self.keys = keys = [k for k in expected if k not in lay["tied"]]
        if lay["experts"]:
            from ternlm.moe.experts import check_expert_sources

            check_expert_sources(lay, self.reader)
        for k in keys:  # every tensor the output needs must be readable, before any work
            module = k.rpartition(".")[0]
            if module in lay["targets"]:
                k = module + ".weight" if not k.endswith(".bias") else k
            elif module in lay["experts"]:
                continue  # checked by the expert converter's names below
            if not self.reader.has(k):
                raise TernlmError(f"tensor {k} is not in the source files of {src}")
        self.units = _units(keys)
        self.names = list(self.units)
        self.shards = {u: shard_name(i, len(self.names)) for i, u in enumerate(self.names)}
        if check_disk:
            from ternlm.streaming.plan import make_plan

            need = make_plan(config.to_dict() if s.gguf_file else src, cfg).bytes_after(cfg.fmt)
            out = self.out
            free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
            if need * 1.05 + (1 << 20) > free:
                raise TernlmError(f"not enough disk for {out}: the plan needs {need / 1e9:.2f} GB, "
                                  f"{free / 1e9:.2f} GB free")
        self.part = partial_dir(self.out)
        self.done: list[str] = []
        self.state: dict = {}

    def start(self, resume: bool, extra: bytes = b"") -> None:
        """Open the partial directory: a fresh one, or (``resume``) the finished units of a killed
        run with the same source and settings (``extra``: more bytes the run depends on)."""
        part = self.part
        self.fingerprint = fp = _fingerprint(self.files, self.cfg, self.rec, extra)
        if part.exists():
            if not resume:
                raise TernlmError(f"an unfinished run is in {part}; pass --resume to continue it or remove it")
            try:
                prog = json.loads((part / PROGRESS_FILE).read_text())
            except (OSError, ValueError):
                prog = None
            if prog is None or prog.get("fingerprint") != fp:
                raise TernlmError(f"{part} was started from a different source or settings; remove it to start over")
            self.done = [u for u in prog.get("done", []) if u in self.units and (part / prog["shards"][u]).is_file()]
            self.state = prog.get("state", {})
        else:
            part.mkdir(parents=True)
            (part / INCOMPLETE).write_text("this directory is an unfinished ternlm quantization; "
                                           "rerun it with --resume\n")

    def write_unit(self, u: str, tensors: dict[str, torch.Tensor], state: dict | None = None) -> None:
        """Write unit ``u``'s output shard, then record it (and ``state``) as done."""
        from safetensors.torch import save_file

        want = set(self.units[u])
        for m in self.lay.get("rows", ()):  # an int8 embedding is written as rows + scales
            if f"{m}.weight" in want:
                want = (want - {f"{m}.weight"}) | {f"{m}.qweight", f"{m}.scale"}
        if set(tensors) != want:
            extra = sorted(set(tensors) ^ want)
            raise TernlmError(f"internal: unit {u} does not produce exactly its tensors ({extra[0]})")
        tmp = self.part / f".{self.shards[u]}.tmp"
        # NOTE: one metadata key only: safetensors writes metadata from a hash map, so two keys come
        # out in a per-process order and a resumed run would differ from an unbroken one. The record
        # goes into the index instead.
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.part / self.shards[u])
        # NOTE: glibc keeps freed heap pages of one unit's temporaries and the heap fragments, so
        # without handing them back the resident set creeps up unit by unit (measured: +150 MiB
        # over 20 blocks of a hidden-2048 Llama).
        from ternlm.eval.cost import release_freed_memory

        release_freed_memory(collect=False)
        self.done.append(u)
        if state is not None:
            self.state = state
        _write_json(self.part / PROGRESS_FILE, {"fingerprint": self.fingerprint, "done": self.done,
                                                "shards": self.shards, "state": self.state})

    def finish(self, extra_files: dict[str, str] | None = None) -> Path:
        """The index, config, tokenizer and record, then the finished directory swapped in by rename."""
        from ternlm.checkpoint import QUANT_FILE, META_KEY
        from ternlm.fileio import atomic_dir
        from ternlm.streaming.files import read_header

        part, names, shards, src, lay = self.part, self.names, self.shards, self.src, self.lay
        weight_map, total = {}, 0
        for u in names:
            for name, e in read_header(part / shards[u]).items():
                weight_map[name] = shards[u]
                total += e.nbytes
        index = {"metadata": {"total_size": total, META_KEY: self.rec},
                 "weight_map": dict(sorted(weight_map.items()))}
        text = json.dumps(self.rec, indent=2, sort_keys=True)

        def write(tmp: Path) -> None:
            lay["model"].config.save_pretrained(tmp)
            gen = getattr(lay["model"], "generation_config", None)
            if (src / "generation_config.json").is_file():  # what from_pretrained would have read
                from transformers import GenerationConfig

                gen = GenerationConfig.from_pretrained(str(src))
            if gen is not None:
                gen.save_pretrained(tmp)
            _copy_tokenizer(src, tmp, self.gguf_file)
            (tmp / QUANT_FILE).write_text(text + "\n")
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            for name, body in (extra_files or {}).items():
                (tmp / name).write_text(body)
            for u in names:
                os.replace(part / shards[u], tmp / shards[u])

        result = atomic_dir(self.out, write)
        shutil.rmtree(part, ignore_errors=True)
        return result


def _copy_tokenizer(src: Path, dst: Path, gguf_file: str | None = None) -> None:
    """The tokenizer, re-saved the way ``save_pretrained`` does (none when the source has none)."""
    from ternlm.models.sources import load_tokenizer

    try:
        tok = load_tokenizer(str(src), gguf_file=gguf_file)
    except TernlmError:
        return
    tok.save_pretrained(dst)
