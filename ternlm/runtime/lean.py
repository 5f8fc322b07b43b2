"""The decode engine's parts read straight from a ternlm checkpoint directory (no Hugging Face model).

``DecodeEngine(ternlm.load(dir))`` builds the whole Hugging Face model first: that imports its
modeling code and widens fp16 embeddings to float32, several times the checkpoint's size in memory
before the first token. ``DecodeEngine.from_checkpoint(dir)`` reads ``config.json``, the quantization
record and the safetensors tensors one at a time instead, and builds exactly the same engine:

- packed ternary layers become ``TernaryLinear`` modules holding the file's codes and scales;
- the token embedding (and an untied head) stay in their stored dtype (fp16): the engine widens one
  row per token, and the LM head storage is the engine's choice (``RuntimeConfig.head``);
- norms, biases and learned positions are float32, as the model would hold them;
- RoPE tables and GPT-2's GELU are computed with Hugging Face's formulas, op for op.

It reads GPT-2 and Llama-family checkpoints with default RoPE. Anything else (other RoPE types,
mixture-of-experts, knowledge tokens, tensors it does not know) is a one-line ``TernlmError``, and
``ternlm generate`` then builds the model the usual way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.errors import TernlmError
from ternlm.quant.pack import upgrade_2bit
from ternlm.runtime.arch import ARCHS, Arch, FloatLinear, Parts, act_kind, gated_silu

def _read_config(d: Path) -> dict:
    f = d / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TernlmError(f"cannot read {f}: {type(e).__name__}") from None
    if not isinstance(cfg, dict):
        raise TernlmError(f"{f} is not a JSON object")
    return cfg


class Checkpoint(NamedTuple):
    """A checkpoint directory read once: its quantization record, config.json and the engine's Arch."""

    directory: Path
    rec: dict
    config: dict
    arch: Arch


def read_checkpoint(directory) -> Checkpoint:
    """Record + config.json + Arch of a ternlm checkpoint the lean loader covers, read once (a one-line
    TernlmError for anything it does not cover)."""
    if isinstance(directory, Checkpoint):
        return directory
    from ternlm.checkpoint import read_record

    d = Path(directory).expanduser()
    if not d.is_dir():
        raise TernlmError(f"no such checkpoint directory: {d}")
    rec = read_record(d)
    cfg = _read_config(d)
    return Checkpoint(d, rec, cfg, _arch_of(d, rec, cfg))


def arch_of_checkpoint(directory) -> Arch:
    """The engine's ``Arch`` from a checkpoint's config.json (``Arch.from_config``: the table's row)."""
    return read_checkpoint(directory).arch


def _arch_of(d: Path, rec: dict, cfg: dict) -> Arch:
    if cfg.get("model_type") not in ARCHS:
        raise TernlmError(f"the decode engine runs {', '.join(ARCHS)} models, not {cfg.get('model_type')!r}")
    if rec.get("experts"):
        raise TernlmError("the lean loader does not read mixture-of-experts checkpoints")
    from ternlm.nn.knowledge import KNOWLEDGE_FILE

    if (d / KNOWLEDGE_FILE).exists():
        raise TernlmError("the lean loader does not read knowledge tokens")
    a = Arch.from_config(cfg)
    if a.positions == "rope" and a.rope_type != "default":
        raise TernlmError(f"the lean loader reads default RoPE only, not {a.rope_type!r}")
    return a


class _Tensors:
    """The checkpoint's tensors by name, read one at a time; every name must be asked for once."""

    def __init__(self, d: Path):
        from ternlm.checkpoint import open_weights, weight_files

        self.where, self.handles = {}, []
        for p in weight_files(d):
            f = open_weights(p)
            self.handles.append(f)
            for k in f.keys():
                self.where[k] = (p, f)
        self.unread = set(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise TernlmError(f"the checkpoint has no tensor {name}")
        p, f = self.where[name]
        try:
            t = f.get_tensor(name)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TernlmError(f"{p} is corrupt or truncated: {msg}") from None
        self.unread.discard(name)
        return t

    def opt(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self.where else None

    def check_all_read(self) -> None:
        if self.unread:
            raise TernlmError(f"the lean loader does not read {len(self.unread)} tensors (e.g. {sorted(self.unread)[0]})")


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def _linear(ts: _Tensors, name: str, in_f: int, out_f: int, rec: dict, conv1d: bool):
    """A block linear: a ``TernaryLinear`` over the file's codes and scales when it is a target, else
    a float layer (GPT-2 Conv1D keeps its (in, out) layout and addmm, as HF computes it)."""
    from ternlm.nn.int8_linear import Int8RowLinear
    from ternlm.nn.ternary_linear import TernaryLinear

    if name in rec.get("int8_layers", ()):  # kept at int8 rows by a bits budget
        bias = ts.opt(f"{name}.bias")
        with torch.device("meta"):
            m = Int8RowLinear(in_f, out_f, bias is not None, 8 if rec["act_bits"] == 8 else None)
        state = {"qweight": ts.get(f"{name}.qweight"), "scale": ts.get(f"{name}.scale").float()}
        if bias is not None:
            state["bias"] = bias.float()
        if tuple(state["qweight"].shape) != (out_f, in_f):
            raise TernlmError(f"tensor {name}.qweight has shape {tuple(state['qweight'].shape)}, expected {(out_f, in_f)}")
        m.load_state_dict(state, assign=True)
        return m.eval()
    if name in rec["targets"]:
        bias = ts.opt(f"{name}.bias")
        with torch.device("meta"):
            m = TernaryLinear(in_f, out_f, bias is not None, rec["act_bits"], rec["fmt"], rec["granularity"],
                              rec["group_size"])
        packed = ts.get(f"{name}.packed")
        if rec["fmt"] == "2bit":  # rows of the earlier layout (padded to whole 256-weight blocks)
            packed = upgrade_2bit(packed, m.packed.shape[-1])
        state = {"packed": packed, "scale": ts.get(f"{name}.scale")}
        if bias is not None:
            state["bias"] = bias.float()
        for k, v in state.items():
            want = getattr(m, k)
            if tuple(v.shape) != tuple(want.shape):
                raise TernlmError(f"tensor {name}.{k} has shape {tuple(v.shape)}, expected {tuple(want.shape)}")
        m.load_state_dict({k: v if k == "packed" else v.to(getattr(m, k).dtype) for k, v in state.items()},
                          assign=True)
        return m.eval()
    w, b = _float(ts.get(f"{name}.weight")), _float(ts.opt(f"{name}.bias"))
    if conv1d:
        return FloatLinear(w, b if b is not None else torch.zeros(out_f), conv1d=True)
    with torch.device("meta"):
        m = nn.Linear(in_f, out_f, bias=b is not None)
    m.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        m.bias = nn.Parameter(b, requires_grad=False)
    return m


def _norm(ts: _Tensors, name: str, bias: bool) -> tuple:
    return _float(ts.get(f"{name}.weight")), _float(ts.get(f"{name}.bias")) if bias else None


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # Hugging Face's NewGELUActivation, op for op (bitwise the same results)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gpt2_act(kind: str, cfg):
    if cfg.gelu == "tanh" and kind in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu_new": _gelu_new, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "gelu": F.gelu}[kind]


def _rope_tables(theta: float, head_dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Hugging Face's default RoPE (LlamaRotaryEmbedding), op for op
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(n)[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()  # HF scales by attention_scaling = 1.0 here


def parts_from_checkpoint(directory, cfg, max_seq_len: int, arch: Arch | None = None) -> Parts:
    """Everything the engine is built from, read tensor by tensor from a ternlm checkpoint (a directory
    or a ``Checkpoint`` already read; ``cfg``: the engine's ``RuntimeConfig``), by the names the
    architecture's row gives."""
    ck = read_checkpoint(directory)
    d, rec, conf = ck.directory, ck.rec, ck.config
    a = arch or ck.arch
    row = a.row
    ts = _Tensors(d)

    def rows(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A table of rows as stored: float (``name.weight``) or int8 (``name.qweight`` + ``name.scale``)."""
        if ts.has(f"{name}.qweight"):
            return ts.get(f"{name}.qweight").contiguous(), ts.get(f"{name}.scale").float().contiguous()
        return ts.get(f"{name}.weight").contiguous(), None

    C, inner, q_out, kv_out = a.hidden, a.inner, a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    # (in, out) of every slot: fused or separate attention inputs, gated or plain MLP inputs
    qkv_shapes = [(C, q_out + 2 * kv_out)] if row.fused_qkv else [(C, q_out), (C, kv_out), (C, kv_out)]
    up_shapes = [(C, inner)] * len(row.up)
    norm_bias = a.norm == "layernorm"
    wte, wte_scale = rows(row.embed)
    wpe = _float(ts.get(f"{row.pos_embed}.weight")) if row.pos_embed else None
    cos = sin = None
    if a.positions == "rope":
        cos, sin = _rope_tables(a.rope_theta, a.head_dim, max_seq_len)
    act = gated_silu(inner) if a.mlp == "gated_silu" else _gpt2_act(conf.get("activation_function", "gelu_new"), cfg)
    blocks = []
    for i in range(a.n_layer):
        p = row.block(i)

        def lin(slot, shape):
            return _linear(ts, f"{p}.{slot.path}", shape[0], shape[1], rec, slot.conv1d)

        blocks.append((_norm(ts, f"{p}.{row.norm1}", norm_bias),
                       tuple(lin(s, sh) for s, sh in zip(row.qkv, qkv_shapes)), lin(row.o, (q_out, C)),
                       _norm(ts, f"{p}.{row.norm2}", norm_bias), tuple(lin(s, sh) for s, sh in zip(row.up, up_shapes)),
                       lin(row.down, (inner, C)), a.head_dim ** -0.5))
    norm_f = _norm(ts, row.final_norm, norm_bias)
    if tuple(wte.shape) != (a.vocab_size, C):
        raise TernlmError(f"token embedding has shape {tuple(wte.shape)}, expected {(a.vocab_size, C)}")
    if ts.has(f"{row.head}.weight") or ts.has(f"{row.head}.qweight"):
        head_w, head_scale = rows(row.head)
        tied = False
    elif a.tied_head:
        head_w, head_scale, tied = wte, wte_scale, True
    else:
        raise TernlmError(f"the checkpoint has no tensor {row.head}.weight and its config does not tie it")
    ts.check_all_read()
    if tied != a.tied_head:
        from dataclasses import replace

        a = replace(a, tied_head=tied)
    kind = act_kind(a, conf.get("activation_function", "gelu_new"))
    return Parts(a, wte, head_w, wpe, norm_f, act, cos, sin, blocks, kind, wte_scale, head_scale)
