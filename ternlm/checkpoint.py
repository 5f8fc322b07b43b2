"""Save and load converted (packed ternary) models as Hugging Face-style directories.

    out_dir/
      config.json                 the HF architecture config, unchanged
      generation_config.json      when the model has one
      tokenizer files             when a tokenizer is given
      ternlm_quantization.json    what was quantized and how (QUANT_FILE, versioned)
      model.safetensors           packed uint8 codes, float32 scales and every other tensor;
                                  the quantization record is repeated in its metadata
      (or) model.safetensors.index.json + model-0000i-of-0000n.safetensors
                                  the sharded form ``ternlm.streaming`` writes, one shard per
                                  block, the record in every shard's metadata

Loading builds the architecture on the meta device, swaps the target layers for empty
``TernaryLinear`` modules and assigns the tensors of the memory-mapped safetensors file, so no
float copy of a ternary weight ever exists. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ternlm.config import QuantConfig, TernaryConfig
from ternlm.errors import TernlmError
from ternlm.fileio import atomic_dir
from ternlm.quant.pack import upgrade_2bit

FORMAT_VERSION = 1  # written for checkpoints that version 1 describes fully
FORMAT_VERSION_ROWS = 2  # written when the embedding (and head) rows are int8 ("embedding": "int8") or a
                         # bits budget kept some block linears at int8 ("int8_layers")
READ_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_ROWS)
QUANT_FILE = "ternlm_quantization.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
META_KEY = "ternlm_quantization"


# ---------------------------------------------------------------------------------------------
# The quantization record


def quantization_record(model: nn.Module) -> dict:
    """The JSON-able description of a converted model's ternary layers."""
    from ternlm import __version__
    from ternlm.nn.surgery import ternary_linears

    layers = ternary_linears(model)
    if not layers:
        raise TernlmError("the model holds no TernaryLinear layers: convert it first (ternlm.conversion.convert)")
    first = layers[0][1]
    for name, m in layers:
        if (m.fmt, m.act_bits, m.granularity, m.group_size) != (first.fmt, first.act_bits, first.granularity,
                                                               first.group_size):
            raise TernlmError(f"ternary layer {name} differs from {layers[0][0]} in format, act_bits or "
                              f"granularity; a checkpoint holds one setting for all layers")
    qc = getattr(model, "ternlm_quant_config", None)
    if not isinstance(qc, QuantConfig) or not isinstance(qc.weights, TernaryConfig):
        qc = QuantConfig(weights=TernaryConfig(granularity=first.granularity, group_size=first.group_size,
                                               act_bits=first.act_bits))
    rec = {
        "format_version": FORMAT_VERSION,
        "method": "ternary",
        "granularity": first.granularity,
        "group_size": first.group_size,
        "fmt": first.fmt,
        "act_bits": first.act_bits,
        "targets": [n for n, _ in layers],
        "quant_config": qc.to_dict(),
        "ternlm_version": __version__,
    }
    from ternlm.moe.experts import ternary_experts

    experts = ternary_experts(model)
    if experts:  # GPT-OSS: 3-D expert modules, packed per expert (ternlm.moe)
        for name, m in experts:
            if (m.fmt, m.act_bits, m.granularity, m.group_size) != (first.fmt, first.act_bits, first.granularity,
                                                                   first.group_size):
                raise TernlmError(f"ternary experts {name} differ from {layers[0][0]} in format, act_bits or "
                                  f"granularity; a checkpoint holds one setting for all layers")
        rec["experts"] = [n for n, _ in experts]
    from ternlm.nn.int8_linear import Int8RowLinear

    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8RowLinear)]
    if int8:  # block linears a bits budget kept at int8 rows
        rec["int8_layers"] = int8
        rec["format_version"] = FORMAT_VERSION_ROWS
    return rec


def check_record(rec, where: str) -> dict:
    """Validate a quantization record read from a file; returns it."""
    from ternlm.config import ACT_BITS, FORMATS, GRANULARITIES

    if not isinstance(rec, dict):
        raise TernlmError(f"{where}: the quantization record is not a JSON object")
    version = rec.get("format_version")
    if version not in READ_VERSIONS:
        raise TernlmError(f"{where}: unsupported ternlm format version {version!r} (this ternlm reads "
                          f"versions {', '.join(map(str, READ_VERSIONS))})")
    if rec.get("embedding", "float") not in ("float", "int8"):
        raise TernlmError(f"{where}: unknown embedding storage {rec.get('embedding')!r}")
    if rec.get("method") != "ternary":
        raise TernlmError(f"{where}: unsupported quantization method {rec.get('method')!r}")
    if rec.get("fmt") not in FORMATS:
        raise TernlmError(f"{where}: unknown packed format {rec.get('fmt')!r}")
    if rec.get("act_bits") not in ACT_BITS:
        raise TernlmError(f"{where}: bad act_bits {rec.get('act_bits')!r}")
    if rec.get("granularity") not in GRANULARITIES \
            or not isinstance(rec.get("group_size"), int) or rec["group_size"] < 1:
        raise TernlmError(f"{where}: bad granularity/group_size {rec.get('granularity')!r}/{rec.get('group_size')!r}")
    targets = rec.get("targets")
    if not isinstance(targets, list) or not (targets or rec.get("experts")) \
            or not all(isinstance(t, str) for t in targets):
        raise TernlmError(f"{where}: the quantization record lists no target layers")
    experts = rec.get("experts", [])
    if not isinstance(experts, list) or not all(isinstance(t, str) for t in experts):
        raise TernlmError(f"{where}: the quantization record's experts are not a list of module names")
    int8 = rec.get("int8_layers", [])
    if not isinstance(int8, list) or not all(isinstance(t, str) for t in int8) or set(int8) & set(targets):
        raise TernlmError(f"{where}: the quantization record's int8_layers are not a list of non-ternary module names")
    QuantConfig.from_dict(rec["quant_config"])  # raises TernlmError on unknown keys
    return rec


def apply_record(model: nn.Module, rec: dict) -> None:
    model.ternlm_quant_config = QuantConfig.from_dict(rec["quant_config"])
    model.ternlm_targets = list(rec["targets"])
    model.ternlm_int8_layers = list(rec.get("int8_layers", []))
    model.ternlm_format = rec["fmt"]
    model.ternlm_experts = list(rec.get("experts", []))


# ---------------------------------------------------------------------------------------------
# Building the empty model


def _dtype_of(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def empty_model(config, rec: dict) -> nn.Module:
    """The HF architecture on the meta device with the target layers swapped for TernaryLinear.

    Nothing is allocated; every tensor must be assigned afterwards (``assign_state``).
    """
    from transformers import AutoModelForCausalLM

    from ternlm.nn.bitlinear import is_linear_like, linear_weight_out_in
    from ternlm.nn.surgery import replace_module
    from ternlm.nn.ternary_linear import TernaryLinear

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype_of(config))
    except Exception as e:
        raise TernlmError(f"cannot build a causal LM for model type {getattr(config, 'model_type', '?')!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    from ternlm.nn.int8_linear import Int8RowLinear

    def swap(name: str, what: str, make) -> None:
        """Replace the linear ``name`` by the empty module ``make(in_f, out_f, has_bias)`` builds."""
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise TernlmError(f"{what} {name!r} does not exist in {type(model).__name__}") from None
        if not is_linear_like(old):
            raise TernlmError(f"{what} {name!r} is a {type(old).__name__}, not a linear layer")
        out_f, in_f = linear_weight_out_in(old).shape
        with torch.device("meta"):
            replace_module(model, name, make(in_f, out_f, old.bias is not None))

    for name in rec["targets"]:
        swap(name, "ternary target", lambda i, o, b: TernaryLinear(i, o, b, rec["act_bits"], rec["fmt"],
                                                                   rec["granularity"], rec["group_size"]))
    for name in rec.get("int8_layers", []):  # kept at int8 rows by a bits budget
        swap(name, "int8 layer", lambda i, o, b: Int8RowLinear(i, o, b, 8 if rec["act_bits"] == 8 else None))
    if rec.get("experts"):
        from ternlm.moe.experts import TernaryExperts

        for name in rec["experts"]:
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise TernlmError(f"ternary experts {name!r} do not exist in {type(model).__name__}") from None
            with torch.device("meta"):
                new = TernaryExperts.empty_like(old, rec["act_bits"], rec["fmt"], rec["granularity"],
                                                rec["group_size"])
            replace_module(model, name, new)
    return model


def embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    """Module names of the model's input embedding and LM head (None where it has none)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    return (names.get(id(emb)) if emb is not None else None, names.get(id(head)) if head is not None else None)


def install_row_modules(model: nn.Module, kinds: dict[str, str]) -> None:
    """Swap the (meta) input embedding and LM head for ``RowEmbedding`` / ``RowHead`` holding rows in
    their stored kind. ``kinds``: {module name: "int8" | "fp16" | "bf16" | "fp32"} for the tensors the
    file holds; a head the file does not hold is tied to the embedding."""
    from ternlm.nn.embedding import RowEmbedding, RowHead

    emb_name, head_name = embedding_names(model)
    if emb_name is None or emb_name not in kinds:
        return
    old = model.get_input_embeddings()
    with torch.device("meta"):
        emb = RowEmbedding(old.num_embeddings, old.embedding_dim, kinds[emb_name], getattr(old, "padding_idx", None))
    model.set_input_embeddings(emb)
    if head_name is None:
        return
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return  # a head with a bias stays a float layer
    with torch.device("meta"):
        if head_name in kinds:
            new = RowHead(head.in_features, head.out_features, kinds[head_name])
        elif getattr(model.config, "tie_word_embeddings", True):
            new = RowHead(head.in_features, head.out_features, tied_to=emb)
        else:
            return
    model.set_output_embeddings(new)


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names that the model re-ties to another tensor (GPT-2's lm_head -> wte)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", True):
        return set()
    return set(tied.keys() if isinstance(tied, dict) else tied)


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Assign ``state`` into a meta-device model built by ``empty_model``; re-tie, rebuild buffers.

    Every mismatch (missing, unexpected, wrong shape or dtype) is a one-line TernlmError.
    """
    expected = model.state_dict()
    tied = tied_names(model)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise TernlmError(f"{where}: {len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise TernlmError(f"{where}: {len(missing)} tensors missing (e.g. {missing[0]})")
    for k, v in state.items():
        want = expected[k]
        if tuple(v.shape) != tuple(want.shape):
            raise TernlmError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(want.shape)}")
        if v.dtype != want.dtype and not (v.dtype.is_floating_point and want.dtype.is_floating_point):
            raise TernlmError(f"{where}: tensor {k} is {v.dtype}, the model expects {want.dtype}")
    for k, v in state.items():  # float tensors stored narrower (fp16 embeddings) come back in the model's dtype
        want = expected[k]
        if v.dtype != want.dtype and v.dtype.is_floating_point and want.dtype.is_floating_point:
            state[k] = v.to(want.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    from ternlm.nn.embedding import RowHead

    if tied and hasattr(model, "tie_weights") and not isinstance(model.get_output_embeddings(), RowHead):
        model.tie_weights()
    rebuild_nonpersistent_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise TernlmError(f"{where}: {len(left)} tensors were not loaded (e.g. {left[0]})")
    return model.eval()


def rebuild_nonpersistent_buffers(model: nn.Module, root: nn.Module | None = None) -> None:
    """Recompute buffers that are not saved (rotary ``inv_freq``) and so are still on meta, in
    ``root`` (default: the whole model) with the model's own initialiser.

    Only modules without parameters of their own are re-initialised, so no loaded weight can be
    overwritten by the architecture's random init.
    """
    for mod in (root if root is not None else model).modules():
        names = [n for n in getattr(mod, "_non_persistent_buffers_set", ()) if
                 getattr(mod, n, None) is not None and getattr(mod, n).is_meta]
        if not names or any(True for _ in mod.parameters(recurse=False)):
            continue
        for n in names:
            setattr(mod, n, torch.empty_like(getattr(mod, n), device="cpu"))
        if hasattr(model, "_init_weights"):
            with torch.no_grad():
                model._init_weights(mod)


# ---------------------------------------------------------------------------------------------
# Save


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses shared storage).

    A tied name (GPT-2's ``lm_head.weight``) is left out and re-tied on load; any other alias is
    saved as its own copy, since the architecture would not recreate it.
    """
    tied = tied_names(model)
    state = model.state_dict()
    out, seen = {}, set()
    for k in sorted(state, key=lambda k: k in tied):  # untied names claim shared storage first
        v = state[k]
        if v.is_meta:
            raise TernlmError(f"tensor {k} is on the meta device and holds no data")
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            if k in tied:
                continue
            v = v.clone()
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def plain_config(config):
    """The config without the GGUF loader's ``quantization_config`` (a model read from a GGUF file is
    float once loaded; that record would send a reader of the checkpoint to the GGUF loader)."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return config
    import copy

    config = copy.deepcopy(config)
    del config.quantization_config
    return config


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


EMBED_DTYPES = ("float", "int8")


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | Path, *, float_dtype: str = "fp32",
                    embed_dtype: str | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a converted model (+ tokenizer) as a ternlm checkpoint directory, atomically.

    float_dtype: storage of the float tensors outside the ternary layers (embeddings, LM head,
    norms): ``fp32``, ``fp16`` or ``bf16``. Packed codes and ternary scales are stored as they are;
    loading keeps the embedding and head in their stored dtype and casts the rest to the model's.
    embed_dtype: ``int8`` stores the token embedding (and an untied head) as int8 rows with one
    float32 scale per row (the canonical int8 quantizer per row; a tied head reads the same rows);
    ``float`` (or None: keep what the model holds) stores them in ``float_dtype``.
    extra_files: name -> text written beside the weights in the same atomic step (a quantization
    log, a model card).
    """
    from safetensors.torch import save_file

    from ternlm.nn.embedding import quantize_rows

    if float_dtype not in TORCH_DTYPES:
        raise TernlmError(f"unknown float_dtype {float_dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    if embed_dtype not in (None, *EMBED_DTYPES):
        raise TernlmError(f"unknown embed_dtype {embed_dtype!r}; choose one of {', '.join(EMBED_DTYPES)}")
    rec = quantization_record(model)
    state = _state_to_save(model)
    rows = [n for n in embedding_names(model) if n is not None]
    for name in rows:
        if embed_dtype == "int8" and f"{name}.weight" in state and state[f"{name}.weight"].dim() == 2:
            state[f"{name}.qweight"], state[f"{name}.scale"] = quantize_rows(state.pop(f"{name}.weight"))
        elif embed_dtype == "float" and f"{name}.qweight" in state:
            q, sc = state.pop(f"{name}.qweight"), state.pop(f"{name}.scale")
            state[f"{name}.weight"] = q.float() * sc[:, None]
    row_scales = {f"{n}.scale" for n in rows if f"{n}.qweight" in state}
    keep32 = {f"{n}.{k}" for n in rec.get("int8_layers", []) for k in ("scale", "bias")}
    if row_scales:
        rec.update(format_version=FORMAT_VERSION_ROWS, embedding="int8")
    targets = tuple(t + "." for t in rec["targets"] + rec.get("experts", []))
    want = TORCH_DTYPES[float_dtype]
    for k, v in state.items():
        if v.is_floating_point() and not k.startswith(targets) and k not in row_scales | keep32 and v.dtype != want:
            state[k] = v.to(want)
    text = json.dumps(rec, indent=2, sort_keys=True)

    def write(tmp: Path) -> None:
        plain_config(model.config).save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / QUANT_FILE).write_text(text + "\n")
        for name, body in (extra_files or {}).items():
            (tmp / name).write_text(body)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", META_KEY: text})

    return atomic_dir(out_dir, write)


# ---------------------------------------------------------------------------------------------
# Load


def read_record(directory: str | Path) -> dict:
    d = Path(directory)
    f = d / QUANT_FILE
    if not f.is_file():
        raise TernlmError(f"{d} is not a ternlm checkpoint: no {QUANT_FILE}")
    try:
        rec = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TernlmError(f"cannot read {f}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return check_record(rec, str(f))


def open_weights(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise TernlmError(f"no {path.name} in {path.parent}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: bad header, truncated data, not a safetensors file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TernlmError(f"{path} is corrupt or truncated: {msg}") from None


def weight_files(directory: str | Path) -> list[Path]:
    """The checkpoint's weight files: ``model.safetensors``, or the shards its index names (checked to exist)."""
    d = Path(directory)
    index = d / INDEX_FILE
    if not index.is_file():
        return [d / WEIGHTS_FILE]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TernlmError(f"cannot read {index}: {type(e).__name__}") from None
    for n in names:
        if not (d / n).is_file():
            raise TernlmError(f"{index} names {n}, which does not exist")
    return [d / n for n in names]


def _open_checkpoint(d: Path) -> tuple[dict, list]:
    """(record, [(path, safe_open handle)]) of checkpoint directory ``d``, after checking that every
    weight file's (or the index's) embedded record is the directory's record."""
    if not d.is_dir():
        raise TernlmError(f"no such checkpoint directory: {d}")
    rec = read_record(d)
    files = [(p, open_weights(p)) for p in weight_files(d)]
    metas = [(p, (f.metadata() or {}).get(META_KEY)) for p, f in files]
    if (d / INDEX_FILE).is_file():  # sharded: the record is in the index
        rec_in_index = json.loads((d / INDEX_FILE).read_text()).get("metadata", {}).get(META_KEY)
        metas.append((d / INDEX_FILE, None if rec_in_index is None else json.dumps(rec_in_index)))
    for wpath, meta in metas:
        if meta is None:
            continue
        try:
            inner = json.loads(meta)
        except json.JSONDecodeError:
            raise TernlmError(f"{wpath}: unreadable quantization metadata") from None
        if {k: v for k, v in inner.items() if k != "ternlm_version"} != \
                {k: v for k, v in rec.items() if k != "ternlm_version"}:
            raise TernlmError(f"{wpath} was written for a different {QUANT_FILE} (the files do not belong together)")
    return rec, files


def _stored_packed(rec: dict, key: str, t: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """A loaded tensor as the model expects it: 2-bit codes of the earlier layout (rows padded to whole
    256-weight blocks) re-laid to the current one."""
    if rec["fmt"] == "2bit" and key.endswith("packed"):
        return upgrade_2bit(t, want.shape[-1])
    return t


def _read_config(d: Path):
    """The HF config of checkpoint directory ``d`` (a one-line error when unreadable)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(d))
    except Exception as e:
        raise TernlmError(f"cannot read the model config in {d}: {type(e).__name__}") from None


def from_pretrained(directory: str | Path, *, kernel: str = "auto") -> nn.Module:
    """Load a ternlm checkpoint directory into a model with packed TernaryLinear layers (eval mode)."""
    from transformers import GenerationConfig

    d = Path(directory).expanduser()
    rec, files = _open_checkpoint(d)
    config = _read_config(d)

    model = empty_model(config, rec)
    state = {}
    for wpath, f in files:
        try:
            state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TernlmError(f"{wpath} is corrupt or truncated: {msg}") from None
    # the embedding and head keep the dtype they are stored in (int8 rows, fp16): no float copy
    install_row_modules(model, _row_kinds(model, state))
    want = model.state_dict()
    state = {k: _stored_packed(rec, k, v, want[k]) if k in want else v for k, v in state.items()}
    wpath = d / (INDEX_FILE if (d / INDEX_FILE).is_file() else WEIGHTS_FILE)
    assign_state(model, state, str(wpath))
    if kernel != "auto":
        from ternlm.nn.surgery import ternary_linears

        from ternlm.moe.experts import ternary_experts

        for _, m in ternary_linears(model) + ternary_experts(model):
            m.kernel = kernel
    if (d / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(d))
        except Exception as e:
            raise TernlmError(f"cannot read {d / 'generation_config.json'}: {type(e).__name__}") from None
    apply_record(model, rec)
    return model


def verify_checkpoint(directory: str | Path, targets: list[str] | None = None):
    """``ternlm.nn.verify.verify`` of a saved checkpoint, read one layer at a time from its files
    (memory holds one layer, not the model: what a streamed checkpoint's model card needs)."""
    from ternlm.nn.verify import verify_by_module
    from ternlm.streaming.files import read_header, read_tensor

    d = Path(directory).expanduser()
    rec, files = _open_checkpoint(d)
    model = empty_model(_read_config(d), rec)
    entries = {}  # tensors are read with plain reads (read_tensor), not through the mapped handles
    for wf, _ in files:
        entries.update(read_header(wf))

    def load(name: str, module: nn.Module) -> None:
        want = module.state_dict()
        state = {}
        for leaf, w in want.items():
            e = entries.get(f"{name}.{leaf}")
            if e is None:
                raise TernlmError(f"{d}: tensor {name}.{leaf} missing")
            state[leaf] = _stored_packed(rec, leaf, read_tensor(e), w)
        module.load_state_dict(state, assign=True)

    return verify_by_module(model, list(targets if targets is not None else rec["targets"]), load)


def _row_kinds(model: nn.Module, state: dict) -> dict[str, str]:
    """{embedding/head module name: stored kind} for the rows ``state`` holds."""
    from ternlm.nn.embedding import ROW_DTYPES

    by_dtype = {v: k for k, v in ROW_DTYPES.items()}
    kinds = {}
    for name in embedding_names(model):
        if name is None:
            continue
        if f"{name}.qweight" in state:
            kinds[name] = "int8"
        elif f"{name}.weight" in state and state[f"{name}.weight"].dtype in by_dtype:
            kinds[name] = by_dtype[state[f"{name}.weight"].dtype]
    return kinds


def checkpoint_summary(directory: str | Path) -> str:
    """A few lines on a saved checkpoint: layers, format, bits per weight, file sizes."""
    from safetensors import safe_open

    d = Path(directory)
    rec = read_record(d)
    n_other = packed_bytes = n_rows = 0
    targets = set(rec["targets"]) | set(rec.get("experts", []))
    files = weight_files(d)
    for wf in files:
        with safe_open(str(wf), framework="pt") as f:
            for k in f.keys():
                numel = 1
                for s in f.get_slice(k).get_shape():
                    numel *= s
                module = k.rpartition(".")[0]
                if module in targets:
                    if k.endswith("packed"):
                        packed_bytes += numel
                elif k.endswith(".qweight"):
                    n_rows += numel
                elif not (k.endswith(".scale") and f"{module}.qweight" in f.keys()):
                    n_other += numel
    cfg = json.loads((d / "config.json").read_text())
    experts = f" + {len(rec['experts'])} ternary expert modules" if rec.get("experts") else ""
    where = files[0].name if len(files) == 1 else f"{len(files)} shards"
    size = sum(wf.stat().st_size for wf in files)
    act = "float (W1.58A16)" if rec["act_bits"] is None else f"int{rec['act_bits']} per token (W1.58A{rec['act_bits']})"
    return (f"saved {d}\n"
            f"  model type {cfg.get('model_type')}, {len(rec['targets'])} ternary layers"
            f"{experts}, packed {rec['fmt']} "
            f"({packed_bytes / 1e6:.1f} MB of codes), {rec['granularity']} scales, activations {act}\n"
            + (f"  {n_rows / 1e6:.1f}M embedding parameters as int8 rows (one scale per row); " if n_rows else "  ")
            + f"{n_other / 1e6:.1f}M other parameters kept in float; {where} {size / 1e6:.1f} MB")


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model (+ tokenizer) as safetensors into out_dir, atomically.

    Everything is written into a temporary directory beside out_dir and swapped in by rename, so
    an interrupted save never leaves a half-written model, and an existing out_dir survives until
    the new one is complete.
    """
    from ternlm.fileio import atomic_dir

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(out_dir, write)
