"""GGUF export and import of converted ternary models (GPT-2 and Llama), for llama.cpp.

Ternary layers go into llama.cpp's ternary block types, with the codes bit-exact:

    TQ2_0  256 weights -> 64 bytes of 2-bit (code + 1) + fp16 d      66 bytes, 2.06 bits/weight
    TQ1_0  256 weights -> 48 bytes base-3 (5 trits/byte) + 4 bytes
                          (4 trits/byte) + fp16 d                     54 bytes, 1.69 bits/weight

Each block's ``d`` is ternlm's scale for those weights, rounded to fp16 (so per-tensor,
per-channel and per-group scales with group_size a multiple of 256 all fit; a partial last group
simply covers fewer blocks). Other group sizes are refused: a block has exactly one scale. Rows
must be whole blocks (llama.cpp requires a row length that is a multiple of the block size), so
ternary layers whose in_features is not a multiple of 256 are refused too, with one line each.
NOTE: scales that are not fp16-representable make the round trip exact only after fp16
rounding: import gives back the codes exactly and each scale rounded to fp16, and exporting
that again gives the same bytes. The trits come from
``gguf.quants`` (the reference encoder of the format) applied to the codes themselves: a block of
codes has absmax 1, so the encoder's rounding reproduces them exactly; ``d`` is then overwritten.
Everything else (embeddings, norms, biases, the LM head) is written as float: 2-D tensors in
``head_dtype``, 1-D tensors in f32, as llama.cpp's own converter does.

Metadata and tensor names follow llama.cpp (``gguf.get_tensor_name_map``): GPT-2's fused
``attn_qkv`` and Conv1D weights transposed to (out, in); Llama's q/k rows permuted from the HF
rotate-half layout to llama.cpp's interleaved RoPE. Two ``ternlm.*`` keys (the quantization
record and the HF config) make the file importable back by ``from_gguf`` without loss; llama.cpp
ignores them.

NOTE on numerics: llama.cpp's TQ kernels quantize activations to int8 per 256-value block (Q8_K),
ternlm per token (A8) or not at all (A16), so logits agree closely but not bit for bit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ternlm.errors import TernlmError

QTYPES = ("tq2_0", "tq1_0")
HEAD_DTYPES = ("f16", "f32", "q8_0")
QK = 256  # weights per TQ block

KEY_RECORD = "ternlm.quantization"
KEY_HF_CONFIG = "ternlm.hf_config"
# Config keys that change with every save/load and say nothing about the model.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover
        raise TernlmError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _arch(model_type: str):
    """gguf-py's MODEL_ARCH for a model type (the architecture table's ``gguf_arch``)."""
    from ternlm.arch import ROWS

    gguf = _gguf()
    if model_type not in ROWS:
        raise TernlmError(f"GGUF export supports model types {', '.join(ROWS)}, not {model_type!r}")
    return gguf.MODEL_ARCH[ROWS[model_type].gguf_arch.upper()]


def _qtype(qtype: str):
    gguf = _gguf()
    q = str(qtype).lower()
    if q not in QTYPES:
        raise TernlmError(f"unknown ternary GGUF type {qtype!r}; choose one of {', '.join(QTYPES)}")
    return {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}[q]


def _file_type(qt):
    gguf = _gguf()
    return {gguf.GGMLQuantizationType.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
            gguf.GGMLQuantizationType.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0}[qt]


def _gguf_name(tmap, hf_name: str, model_type: str) -> str:
    gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise TernlmError(f"no GGUF name for tensor {hf_name} of {model_type}")
    return gname


def _config_json(model: nn.Module) -> str:
    d = model.config.to_dict()
    for k in _VOLATILE_CONFIG_KEYS:
        d.pop(k, None)
    # the dtype the float tensors have, not the config's (often unset) default
    dtypes = [t.dtype for t in model.parameters() if t.is_floating_point()]
    d["dtype"] = str(dtypes[0]).removeprefix("torch.") if dtypes else "float32"
    return json.dumps(d, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Llama's q/k row order: HF keeps each head as [first halves | second halves] (rotate_half),
# llama.cpp as interleaved pairs. The permutation only moves whole rows, so codes stay exact.


def _permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp row order of a q/k projection; x (out, ...) with out = n_head * head_dim."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _rope_heads(config, hf_name: str) -> int | None:
    """Head count whose rows must be permuted for this tensor (the table's slots with ``rope``: Llama's
    q/k, which llama.cpp stores for interleaved RoPE), or None."""
    from ternlm.arch import ROWS

    row = ROWS.get(getattr(config, "model_type", None))
    if row is None:
        return None
    for slot in row.qkv:
        if slot.rope and f".{slot.path}." in hf_name:
            return config.num_attention_heads if slot.rope == "q" else \
                (config.num_key_value_heads or config.num_attention_heads)
    return None


# ---------------------------------------------------------------------------------------------
# Ternary blocks


def _block_scales(m, n_blocks: int, name: str) -> torch.Tensor:
    """ternlm's scale(s) of a TernaryLinear, one per 256-weight block: (out, n_blocks) float32."""
    out_f = m.out_features
    s = m.scale.float()
    if m.granularity == "per_tensor":
        return s.reshape(1, 1).expand(out_f, n_blocks).contiguous()
    if m.granularity == "per_channel":
        return s.reshape(out_f, 1).expand(out_f, n_blocks).contiguous()
    if m.group_size % QK:
        raise TernlmError(f"{name}: per_group scales with group_size {m.group_size} do not fit GGUF's ternary "
                          f"types, which need per_tensor/per_channel scales or groups of {QK} (or a multiple)")
    # block b of a row lies in group b * 256 // group_size (the last group may cover fewer blocks)
    return s.repeat_interleave(m.group_size // QK, dim=1)[:, :n_blocks].contiguous()


def _fp16_scales(s: torch.Tensor, name: str) -> np.ndarray:
    h = s.numpy().astype(np.float16)
    if not np.isfinite(h).all():
        raise TernlmError(f"{name}: a ternary scale does not fit in fp16 (|scale| > 65504)")
    return h


def encode_ternary_blocks(codes: torch.Tensor, d: np.ndarray, qt) -> np.ndarray:
    """int8 codes (out, in) and fp16 block scales (out, in // 256) -> raw TQ blocks (out, bytes)."""
    gguf = _gguf()
    out_f, in_f = codes.shape
    raw = gguf.quants.quantize(codes.numpy().astype(np.float32), qt)  # absmax-1 blocks: codes exact
    bpb = gguf.GGML_QUANT_SIZES[qt][1]
    blocks = raw.reshape(out_f, in_f // QK, bpb)
    blocks[..., bpb - 2:] = d.astype(np.float16).view(np.uint8).reshape(out_f, in_f // QK, 2)
    return blocks.reshape(out_f, -1)


def decode_ternary_blocks(raw: np.ndarray, shape: tuple[int, int], qt) -> tuple[torch.Tensor, np.ndarray]:
    """Raw TQ blocks (out, bytes) -> int8 codes (out, in) and fp16 block scales (out, in // 256)."""
    gguf = _gguf()
    out_f, in_f = shape
    bpb = gguf.GGML_QUANT_SIZES[qt][1]
    blocks = np.array(raw, dtype=np.uint8).reshape(out_f, in_f // QK, bpb)
    d = blocks[..., bpb - 2:].copy().view(np.float16).reshape(out_f, in_f // QK)
    # with d = 1 the reference decoder returns the codes themselves
    blocks[..., bpb - 2:] = np.array([1.0], dtype=np.float16).view(np.uint8)
    codes = gguf.quants.dequantize(blocks.reshape(out_f, -1), qt)
    return torch.from_numpy(np.ascontiguousarray(codes)).to(torch.int8), d


def _scale_from_blocks(d: torch.Tensor, rec: dict, name: str) -> torch.Tensor:
    """Invert ``_block_scales``: (out, n_blocks) float32 -> the layer's scale tensor."""
    gran = rec["granularity"]
    if gran == "per_tensor":
        if not bool((d == d.reshape(-1)[0]).all()):
            raise TernlmError(f"{name}: block scales differ, but the file records per_tensor scales")
        return d.reshape(-1)[0].clone()
    if gran == "per_channel":
        if not bool((d == d[:, :1]).all()):
            raise TernlmError(f"{name}: block scales differ within a row, but the file records per_channel scales")
        return d[:, 0].contiguous()
    gsize = rec["group_size"]
    if gsize % QK:
        raise TernlmError(f"{name}: the file records per_group scales with group_size {gsize}, "
                          f"which GGUF's {QK}-weight blocks cannot hold")
    per = gsize // QK
    n_blocks = d.shape[1]
    groups = -(-n_blocks // per)
    pad = groups * per - n_blocks  # a partial last group: repeat its last block's scale
    g = torch.cat([d, d[:, -1:].expand(-1, pad)], 1).reshape(d.shape[0], groups, per)
    if not bool((g == g[..., :1]).all()):
        raise TernlmError(f"{name}: block scales differ within a group of {gsize}")
    return g[..., 0].contiguous()


# ---------------------------------------------------------------------------------------------
# Vocabulary


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's "gpt2" (byte-level BPE) vocabulary from a Hugging Face fast tokenizer."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "merges" not in model:
        raise TernlmError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise TernlmError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                          f"vocab_size {vocab_size}")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            t = rev[i]
            if t in added:
                types.append(int(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED))
            else:
                types.append(int(gguf.TokenType.NORMAL))
            tokens.append(t)
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int):
            special[kind] = tid
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges,
            "special": special}


def _write_vocab(w, vocab: dict) -> None:
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for kind in ("bos", "eos", "unk", "pad"):
        if kind in vocab["special"]:
            getattr(w, f"add_{kind}_token_id")(vocab["special"][kind])


# ---------------------------------------------------------------------------------------------
# Export


def _hparams(w, config, arch, file_type) -> None:
    gguf = _gguf()
    if arch == gguf.MODEL_ARCH.GPT2:
        w.add_block_count(config.n_layer)
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        w.add_block_count(config.num_hidden_layers)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // config.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope_type != "default":
            raise TernlmError(f"GGUF export does not handle rope_type {rope_type!r}")
    w.add_file_type(file_type)


def _float_tensor(w, gname: str, t: torch.Tensor, head_dtype: str) -> None:
    gguf = _gguf()
    a = t.detach().float().contiguous().numpy()
    if a.ndim < 2 or head_dtype == "f32":
        w.add_tensor(gname, a.astype(np.float32))
    elif head_dtype == "f16":
        w.add_tensor(gname, a.astype(np.float16))
    else:
        if a.shape[-1] % 32:
            raise TernlmError(f"{gname}: q8_0 needs rows that are a multiple of 32 long, got {a.shape[-1]}")
        qt = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)


def _ternary_tensor(w, gname: str, module: str, m, heads: int | None, qt) -> None:
    if m.in_features % QK:
        raise TernlmError(f"{module}: in_features {m.in_features} is not a multiple of {QK}; GGUF's ternary "
                          f"types (TQ1_0/TQ2_0) store whole {QK}-weight blocks per row")
    codes = m.ternary().codes  # (out, in) int8
    d = _block_scales(m, m.in_features // QK, module)  # (out, in // 256)
    if heads is not None:
        codes, d = _permute_rows(codes, heads), _permute_rows(d, heads)
    w.add_tensor(gname, encode_ternary_blocks(codes, _fp16_scales(d, module), qt), raw_dtype=qt)


def _source(model_or_dir, tokenizer):
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, tokenizer
    from ternlm.checkpoint import from_pretrained
    from ternlm.models.sources import load_tokenizer

    model = from_pretrained(model_or_dir)
    return model, tokenizer if tokenizer is not None else load_tokenizer(model_or_dir)


def export_gguf(model_or_dir, out_file: str | Path, qtype: str = "tq2_0", *, head_dtype: str | None = None,
                tokenizer=None) -> Path:
    """Write a converted GPT-2 or Llama model (or a ternlm checkpoint directory) as a GGUF file.

    qtype: ``tq2_0`` (2.06 bits/weight, fastest in llama.cpp) or ``tq1_0`` (1.69 bits/weight)
        for the ternary layers; their in_features must be a multiple of 256.
    head_dtype: ``f16``, ``f32`` or ``q8_0`` for the 2-D float tensors (embeddings, LM head,
        linear layers left out of quantization); 1-D tensors are always f32. Default: ``q8_0`` when
        the checkpoint keeps its embedding as int8 rows, else ``f16``.
    tokenizer: the vocabulary to embed (a byte-level BPE fast tokenizer); by default the
        checkpoint directory's, or the one recorded on a model imported by ``from_gguf``.
    The file is written beside ``out_file`` and renamed into place, so it is never half-written.
    """
    from ternlm.checkpoint import quantization_record, tied_names
    from ternlm.conversion import ternary_linears
    from ternlm.nn.bitlinear import conv1d_class

    gguf = _gguf()
    qt = _qtype(qtype)
    if head_dtype is not None and head_dtype not in HEAD_DTYPES:
        raise TernlmError(f"unknown head_dtype {head_dtype!r}; choose one of {', '.join(HEAD_DTYPES)}")
    model, tokenizer = _source(model_or_dir, tokenizer)
    config = model.config
    arch = _arch(getattr(config, "model_type", None))
    rec = quantization_record(model)
    if tokenizer is not None:
        vocab = vocab_from_tokenizer(tokenizer, config.vocab_size)
    elif getattr(model, "ternlm_gguf_vocab", None) is not None:
        vocab = model.ternlm_gguf_vocab
    else:
        raise TernlmError("GGUF export needs the tokenizer: pass tokenizer=")

    tern = dict(ternary_linears(model))
    from ternlm.nn.embedding import RowEmbedding, RowHead

    rows = {n: m for n, m in model.named_modules() if isinstance(m, (RowEmbedding, RowHead))}
    from ternlm.nn.int8_linear import Int8RowLinear

    int8_layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8RowLinear)}
    if head_dtype is None:  # int8 rows stay 8-bit (Q8_0), float ones f16
        head_dtype = "q8_0" if any(m.kind == "int8" for m in rows.values()) else "f16"
    tmap = gguf.get_tensor_name_map(arch, getattr(config, "num_hidden_layers", None) or config.n_layer)
    tied = tied_names(model)
    conv1d = conv1d_class()
    conv_weights = {f"{n}.weight" for n, m in model.named_modules() if conv1d is not None and isinstance(m, conv1d)}

    out = Path(out_file).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(f"ternlm-{config.model_type}")
        _hparams(w, config, arch, _file_type(qt))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_vocab(w, vocab)
        w.add_string(KEY_RECORD, json.dumps(rec, sort_keys=True))
        w.add_string(KEY_HF_CONFIG, _config_json(model))

        for name, t in model.state_dict().items():
            if name in tied:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            module, _, leaf = name.rpartition(".")
            if module in rows:  # embedding / head kept as int8 or fp16 rows: written as a float table
                if leaf == "scale":
                    continue
                name, t = f"{module}.weight", rows[module].dequantize()
            elif module in int8_layers and leaf in ("qweight", "scale"):  # kept at int8 by a budget: Q8_0
                if leaf == "qweight":
                    gname = _gguf_name(tmap, f"{module}.weight", config.model_type)
                    t = int8_layers[module].dequantize_weight()
                    heads = _rope_heads(config, f"{module}.weight")
                    _float_tensor(w, gname, _permute_rows(t, heads) if heads is not None else t, "q8_0")
                continue
            heads = _rope_heads(config, name)
            if module in tern and leaf in ("packed", "scale"):
                if leaf == "packed":
                    _ternary_tensor(w, _gguf_name(tmap, f"{module}.weight", config.model_type),
                                    module, tern[module], heads, qt)
                continue
            gname = _gguf_name(tmap, name, config.model_type)
            if name in conv_weights:
                t = t.t()  # Conv1D stores (in, out); GGUF wants (out, in) like nn.Linear
            if heads is not None:
                t = _permute_rows(t, heads)
            _float_tensor(w, gname, t, head_dtype)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Import


def _field(reader, key: str, path):
    f = reader.fields.get(key)
    if f is None:
        raise TernlmError(f"{path}: no {key} in the GGUF metadata (not written by ternlm export_gguf?)")
    return f.contents()


def _vocab_from_reader(reader, path) -> dict:
    gguf = _gguf()
    keys = gguf.Keys.Tokenizer
    special = {}
    for kind, key in (("bos", keys.BOS_ID), ("eos", keys.EOS_ID), ("unk", keys.UNK_ID), ("pad", keys.PAD_ID)):
        if key in reader.fields:
            special[kind] = int(reader.fields[key].contents())
    return {"model": _field(reader, keys.MODEL, path), "pre": _field(reader, keys.PRE, path),
            "tokens": list(_field(reader, keys.LIST, path)),
            "types": [int(x) for x in _field(reader, keys.TOKEN_TYPE, path)],
            "merges": list(_field(reader, keys.MERGES, path)), "special": special}


def from_gguf(path: str | Path) -> nn.Module:
    """Import a GGUF file written by ``export_gguf`` into a model with packed TernaryLinear layers.

    Codes come back exactly; scales are the fp16-rounded ternlm scales, so exporting the imported
    model again (with the same qtype and an f16/f32 head_dtype) gives the same bytes. A q8_0
    head comes back dequantized. The file's vocabulary is kept on the model
    (``ternlm_gguf_vocab``) for that re-export.
    """
    from transformers import AutoConfig

    from ternlm.checkpoint import apply_record, assign_state, check_record, empty_model
    from ternlm.conversion import ternary_linears
    from ternlm.nn.bitlinear import conv1d_class
    from ternlm.quant.pack import pack

    gguf = _gguf()
    p = Path(path).expanduser()
    if not p.is_file():
        raise TernlmError(f"no such GGUF file: {p}")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # bad magic, truncated header or data, unknown types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TernlmError(f"{p} is not a readable GGUF file: {msg}") from None
    try:
        rec = check_record(json.loads(_field(reader, KEY_RECORD, p)), str(p))
        cfg_dict = json.loads(_field(reader, KEY_HF_CONFIG, p))
    except json.JSONDecodeError:
        raise TernlmError(f"{p}: unreadable ternlm metadata") from None
    arch_name = _field(reader, gguf.Keys.General.ARCHITECTURE, p)
    try:
        config = AutoConfig.for_model(**cfg_dict)
    except Exception as e:
        raise TernlmError(f"{p}: cannot rebuild the model config: {type(e).__name__}") from None
    arch = _arch(config.model_type)
    if gguf.MODEL_ARCH_NAMES[arch] != arch_name:
        raise TernlmError(f"{p}: architecture {arch_name!r} does not match its config ({config.model_type!r})")

    model = empty_model(config, rec)
    tern = dict(ternary_linears(model))
    tmap = gguf.get_tensor_name_map(arch, getattr(config, "num_hidden_layers", None) or config.n_layer)
    conv1d = conv1d_class()
    conv_weights = {f"{n}.weight" for n, m in model.named_modules() if conv1d is not None and isinstance(m, conv1d)}
    # GGUF name -> (HF name, what it holds)
    from ternlm.nn.int8_linear import Int8RowLinear

    int8_mods = {n for n, m in model.named_modules() if isinstance(m, Int8RowLinear)}
    by_gguf = {}
    for name in model.state_dict():
        module, _, leaf = name.rpartition(".")
        if module in int8_mods and leaf in ("qweight", "scale"):
            if leaf == "qweight":
                by_gguf[_gguf_name(tmap, f"{module}.weight", config.model_type)] = (module, "int8")
            continue
        if module in tern and leaf in ("packed", "scale"):
            if leaf == "packed":
                by_gguf[_gguf_name(tmap, f"{module}.weight", config.model_type)] = (module, "ternary")
            continue
        by_gguf[_gguf_name(tmap, name, config.model_type)] = (name, "float")

    qtypes = {gguf.GGMLQuantizationType.TQ2_0, gguf.GGMLQuantizationType.TQ1_0}
    floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0}
    state = {}
    for t in reader.tensors:
        if t.name not in by_gguf:
            raise TernlmError(f"{p}: unexpected tensor {t.name}")
        hf, kind = by_gguf[t.name]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        heads = _rope_heads(config, hf + ".")
        if kind == "ternary":
            m = tern[hf]
            if t.tensor_type not in qtypes:
                raise TernlmError(f"{p}: {t.name} should be TQ1_0/TQ2_0, is {t.tensor_type.name}")
            if shape != (m.out_features, m.in_features):
                raise TernlmError(f"{p}: {t.name} has shape {shape}, the model expects "
                                  f"{(m.out_features, m.in_features)}")
            codes, d = decode_ternary_blocks(t.data, shape, t.tensor_type)
            d = torch.from_numpy(d.astype(np.float32))
            if heads is not None:
                codes, d = _unpermute_rows(codes, heads), _unpermute_rows(d, heads)
            state[f"{hf}.packed"] = pack(codes.contiguous(), rec["fmt"])
            state[f"{hf}.scale"] = _scale_from_blocks(d, rec, t.name)
            continue
        if t.tensor_type not in floats:
            raise TernlmError(f"{p}: {t.name} has unsupported type {t.tensor_type.name}")
        a = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 \
            else np.asarray(t.data)
        x = torch.from_numpy(np.array(a, dtype=np.float32)).reshape(shape)
        if heads is not None:
            x = _unpermute_rows(x, heads)
        if hf in conv_weights:
            x = x.t().contiguous()
        if kind == "int8":  # Q8_0 blocks back to int8 rows (requantized per row: close, not bit-exact)
            q = Int8RowLinear.from_weight(x, None)
            state[f"{hf}.qweight"], state[f"{hf}.scale"] = q.qweight, q.scale
            continue
        state[hf] = x
    assign_state(model, _cast_floats(model, state), str(p))
    apply_record(model, rec)
    model.ternlm_gguf_vocab = _vocab_from_reader(reader, p)
    return model


def _cast_floats(model: nn.Module, state: dict) -> dict:
    """Float tensors in the dtype the architecture declares (GGUF stores f16/f32)."""
    want = model.state_dict()
    return {k: (v.to(want[k].dtype) if v.is_floating_point() and k in want else v) for k, v in state.items()}
