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

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.errors import TernlmError
from ternlm.quant.pack import upgrade_2bit
from ternlm.runtime.arch import ARCHS, Arch, FloatLinear, Parts, act_kind, gated_silu

GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def _read_config(d: Path) -> dict:
    f = d / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TernlmError(f"cannot read {f}: {type(e).__name__}") from None
    if not isinstance(cfg, dict):
        raise TernlmError(f"{f} is not a JSON object")
    return cfg


def _rope_theta(cfg: dict) -> float:
    """theta of default RoPE (``rope_parameters`` in current configs, ``rope_theta`` in older ones)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if rp.get("rope_type", "default") != "default":
            raise TernlmError(f"the lean loader reads default RoPE only, not {rp.get('rope_type')!r}")
        return float(rp.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        raise TernlmError(f"the lean loader reads default RoPE only, not {rs.get('rope_type') or rs.get('type')!r}")
    return float(cfg.get("rope_theta", 10000.0))


def arch_of_checkpoint(directory) -> Arch:
    """The engine's ``Arch`` from a checkpoint's config.json (what ``describe`` reads off the model)."""
    from ternlm.checkpoint import read_record

    d = Path(directory).expanduser()
    if not d.is_dir():
        raise TernlmError(f"no such checkpoint directory: {d}")
    rec = read_record(d)
    cfg = _read_config(d)
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise TernlmError(f"the decode engine runs {', '.join(ARCHS)} models, not {mt!r}")
    if rec.get("experts"):
        raise TernlmError("the lean loader does not read mixture-of-experts checkpoints")
    from ternlm.nn.knowledge import KNOWLEDGE_FILE

    if (d / KNOWLEDGE_FILE).exists():
        raise TernlmError("the lean loader does not read knowledge tokens")
    try:
        if mt == "gpt2":
            for k in ("add_cross_attention", "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx"):
                if cfg.get(k):
                    raise TernlmError(f"the lean loader does not read GPT-2 configs with {k}")
            if not cfg.get("scale_attn_weights", True):
                raise TernlmError("the lean loader does not read GPT-2 configs without scale_attn_weights")
            if cfg.get("activation_function", "gelu_new") not in GPT2_ACTS:
                raise TernlmError(f"the lean loader does not read activation {cfg['activation_function']!r}")
            C, nh = cfg["n_embd"], cfg["n_head"]
            return Arch(mt, cfg["n_layer"], C, nh, nh, C // nh, cfg.get("n_inner") or 4 * C, cfg["vocab_size"],
                        cfg["n_positions"], "layernorm", cfg.get("layer_norm_epsilon", 1e-5), "learned", "gelu",
                        cfg.get("tie_word_embeddings", True))
        if cfg.get("hidden_act", "silu") != "silu":
            raise TernlmError(f"the decode engine runs gated SiLU Llama MLPs, not {cfg['hidden_act']!r}")
        _rope_theta(cfg)
        C, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        return Arch(mt, cfg["num_hidden_layers"], C, nh, cfg.get("num_key_value_heads") or nh,
                    cfg.get("head_dim") or C // nh, cfg["intermediate_size"], cfg["vocab_size"],
                    cfg["max_position_embeddings"], "rmsnorm", cfg.get("rms_norm_eps", 1e-6), "rope", "gated_silu",
                    cfg.get("tie_word_embeddings", False))
    except KeyError as e:
        raise TernlmError(f"{d / 'config.json'} has no {e.args[0]!r}") from None


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
    """Everything the engine is built from, read tensor by tensor from a ternlm checkpoint
    (``cfg``: the engine's ``RuntimeConfig``)."""
    from ternlm.checkpoint import read_record

    d = Path(directory).expanduser()
    a = arch or arch_of_checkpoint(d)
    rec = read_record(d)
    conf = _read_config(d)
    ts = _Tensors(d)
    C, inner, q_out, kv_out = a.hidden, a.inner, a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    scaling = a.head_dim ** -0.5
    blocks = []
    def rows(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A table of rows as stored: float (``name.weight``) or int8 (``name.qweight`` + ``name.scale``)."""
        if ts.has(f"{name}.qweight"):
            return ts.get(f"{name}.qweight").contiguous(), ts.get(f"{name}.scale").float().contiguous()
        return ts.get(f"{name}.weight").contiguous(), None

    if a.model_type == "gpt2":
        wte, wte_scale = rows("transformer.wte")
        wpe = _float(ts.get("transformer.wpe.weight"))
        cos = sin = None
        act = _gpt2_act(conf.get("activation_function", "gelu_new"), cfg)
        for i in range(a.n_layer):
            p = f"transformer.h.{i}"
            blocks.append((_norm(ts, f"{p}.ln_1", True), (_linear(ts, f"{p}.attn.c_attn", C, 3 * C, rec, True),),
                           _linear(ts, f"{p}.attn.c_proj", C, C, rec, True), _norm(ts, f"{p}.ln_2", True),
                           (_linear(ts, f"{p}.mlp.c_fc", C, inner, rec, True),),
                           _linear(ts, f"{p}.mlp.c_proj", inner, C, rec, True), scaling))
        norm_f = _norm(ts, "transformer.ln_f", True)
    else:
        wte, wte_scale = rows("model.embed_tokens")
        wpe = None
        cos, sin = _rope_tables(_rope_theta(conf), a.head_dim, max_seq_len)
        act = gated_silu(inner)
        for i in range(a.n_layer):
            p = f"model.layers.{i}"
            at, mlp = f"{p}.self_attn", f"{p}.mlp"
            qkv = (_linear(ts, f"{at}.q_proj", C, q_out, rec, False), _linear(ts, f"{at}.k_proj", C, kv_out, rec, False),
                   _linear(ts, f"{at}.v_proj", C, kv_out, rec, False))
            up = (_linear(ts, f"{mlp}.gate_proj", C, inner, rec, False), _linear(ts, f"{mlp}.up_proj", C, inner, rec, False))
            blocks.append((_norm(ts, f"{p}.input_layernorm", False), qkv, _linear(ts, f"{at}.o_proj", q_out, C, rec, False),
                           _norm(ts, f"{p}.post_attention_layernorm", False), up,
                           _linear(ts, f"{mlp}.down_proj", inner, C, rec, False), scaling))
        norm_f = _norm(ts, "model.norm", False)
    if tuple(wte.shape) != (a.vocab_size, C):
        raise TernlmError(f"token embedding has shape {tuple(wte.shape)}, expected {(a.vocab_size, C)}")
    if ts.has("lm_head.weight") or ts.has("lm_head.qweight"):
        head_w, head_scale = rows("lm_head")
        tied = False
    elif a.tied_head:
        head_w, head_scale, tied = wte, wte_scale, True
    else:
        raise TernlmError("the checkpoint has no tensor lm_head.weight and its config does not tie it")
    ts.check_all_read()
    if tied != a.tied_head:
        from dataclasses import replace

        a = replace(a, tied_head=tied)
    kind = act_kind(a.model_type, conf.get("activation_function", "gelu_new"))
    return Parts(a, wte, head_w, wpe, norm_f, act, cos, sin, blocks, kind, wte_scale, head_scale)
