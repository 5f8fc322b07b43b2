"""One batch-1 decode engine for GPT-2 and Llama-family models (ternary or float block linears).

Built from a Hugging Face causal LM whose block linears are ``TernaryLinear`` (after ``ternlm.conversion``)
or plain Conv1D / nn.Linear. The model's config becomes an ``Arch`` (norm, positions, MLP, heads, biases,
head tying); the per-architecture pieces (LayerNorm or RMSNorm, learned positions or RoPE, GELU or gated
SiLU MLP) are chosen once when the engine is built, and one block step serves every architecture:

    x = norm1(h); qkv = W_qkv x                  q/k/v rows concatenated once at bind time
    y = attn_decode(qkv, cache, pos)             compiled: RoPE, cache write, grouped-query attention
    h += W_o y                                   residual in place
    h += W_down act(W_up norm2(h))               W_up: c_fc, or gate/up rows concatenated (gated SiLU)

What it removes from the per-token path, compared with ``model.generate``: the cache object, mask
construction, logits processors and module-call overhead. What it keeps is the model's math, op for op,
so greedy tokens equal HF's:

    prefill(ids)      all prompt tokens at once (GEMM kernels, causal SDPA), fills the KV cache
    decode_step(tok)  one token through the block step above, n_layer times, then the head
    generate(ids)     prefill + decode loop + sampling, timed

Every linear layer is a kernel binding made once at construction (``ternlm.kernels.bind_linear``
for packed ternary layers, ``bind_int8_linear`` / ``bind_float_rows`` for the head); per token
they write into buffers allocated once. The KV cache is a static pair of
(n_layer, n_kv_head, max_seq_len, head_dim) tensors. The token embedding stays in the dtype it is stored
in (rows are widened one at a time). The LM head (tied or not; most of the bytes a token touches) can be
kept fp32, stored fp16/bf16, or quantized to int8 rows (per-row absmax) run by the W8A8 or W8A16 GEMV
kernel. A mixture-of-experts MLP plugs in as another ``mlp`` kind: a block's ``mlp`` callable.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.config import HEADS, check_sampling
from ternlm.errors import TernlmError
from ternlm.kernels import attn_decode, bind_float_rows, bind_int8_linear, int8_row_stride, pad_int8_rows, rope
from ternlm.runtime.arch import ARCHS, Arch, FloatLinear, Parts, act_kind, gated_silu

__all__ = ["DecodeEngine", "GPT2Runtime", "RuntimeConfig", "Arch", "ARCHS", "Parts", "describe", "HEADS"]


STEPS = ("auto", "compiled", "python")


@dataclass
class RuntimeConfig:
    """head: LM-head weight storage (``auto``: the dtype its rows are stored in, no copy). head_act_bits: for the int8 head, 8 quantizes the final
    hidden state per token (W8A8, integer dot products) and None keeps it float (W8A16).
    max_seq_len: KV-cache length (default: the model's n_positions).
    gelu: ``model`` calls the model's own activation module (HF's gelu_new, seven elementwise ops,
    bitwise what HF computes); ``tanh`` is the same formula as one fused op (rounding differs by
    ~1 ulp, four times faster on a 3072-wide row).
    step: how a decode step runs. ``compiled``: the whole token (every layer and the head) in one call
    of the compiled kernels (``csrc/decode_step.inc``), no Python between the kernels; ``python``: the
    same kernels called op by op from Python, with torch's norms and activations (the reference twin);
    ``auto``: compiled when every piece has a compiled twin (packed W1.58A8 linears, compiled kernels
    available), else python."""

    head: str = "fp32"
    head_act_bits: Optional[int] = 8
    max_seq_len: Optional[int] = None
    gelu: str = "model"
    step: str = "auto"

    def __post_init__(self):
        if self.head not in HEADS:
            raise TernlmError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.head_act_bits not in (8, None):
            raise TernlmError(f"head_act_bits must be 8 or None, got {self.head_act_bits!r}")
        if self.gelu not in ("model", "tanh"):
            raise TernlmError(f"gelu must be 'model' or 'tanh', got {self.gelu!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise TernlmError("max_seq_len must be >= 1")
        if self.step not in STEPS:
            raise TernlmError(f"step must be one of {', '.join(STEPS)}, got {self.step!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Architecture description


def describe(model: nn.Module) -> Arch:
    """The model's ``Arch`` (``ternlm.arch``: one row per architecture); a one-line TernlmError when the
    engine does not cover it."""
    hc = getattr(model, "config", None)
    if hc is None or getattr(hc, "model_type", None) not in ARCHS:
        mt = getattr(hc, "model_type", None)
        raise TernlmError(f"the decode engine runs {', '.join(ARCHS)} models, not {mt or type(model).__name__!r}")
    return Arch.from_config(hc, tied=_tied(model))


def _tied(model) -> bool:
    from ternlm.nn.embedding import RowHead

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, RowHead):
        return head.tied
    return head is None or head.weight.data_ptr() == emb.weight.data_ptr()


def _rows_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows in their stored dtype, int8 scale per row or None) of an embedding or LM head."""
    from ternlm.nn.embedding import RowEmbedding, RowHead

    if isinstance(m, (RowEmbedding, RowHead)):
        r = m.rows.detach()
        return r.contiguous(), (m._src.scale.detach().contiguous() if isinstance(m, RowHead) else
                                m.scale.detach().contiguous()) if m.kind == "int8" else None
    w = m.weight.detach()
    return (w if w.is_contiguous() else w.contiguous()), None


# ---------------------------------------------------------------------------------------------
# Linear layers as plain callables: lin(x (M, K), out (M, N) or None) -> (M, N) float32


def _float_linear(m: nn.Module) -> FloatLinear:
    if isinstance(m, nn.Linear):
        return FloatLinear(m.weight.detach().float(), None if m.bias is None else m.bias.detach().float())
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, Conv1D):
        return FloatLinear(m.weight.detach().float(), m.bias.detach().float(), conv1d=True)
    raise TernlmError(f"the decode engine cannot bind a {type(m).__name__} linear")


def _out_features(m: nn.Module) -> int:
    if hasattr(m, "out_features"):
        return m.out_features
    return m.weight.shape[1]  # Conv1D: (in, out)


def _bind(*mods: nn.Module) -> Callable:
    """One callable for one or more linears reading the same input, outputs concatenated.

    Packing is per row, so same-kind TernaryLinears concatenate exactly: packed rows stacked, scales
    expanded to per-channel (or per-group rows) and stacked, one kernel binding. nn.Linears stack
    their weights. Anything else runs one call per module into a concatenated output."""
    from ternlm.kernels import bind_linear
    from ternlm.nn.int8_linear import Int8RowLinear
    from ternlm.nn.ternary_linear import TernaryLinear

    if len(mods) == 1:
        m = mods[0]
        if isinstance(m, FloatLinear):
            return m
        return m.bind() if isinstance(m, (TernaryLinear, Int8RowLinear)) else _float_linear(m)
    m0 = mods[0]
    same = ("in_features", "fmt", "act_bits", "granularity", "group_size", "kernel")
    if all(isinstance(m, TernaryLinear) for m in mods) and \
            all(getattr(m, a) == getattr(m0, a) for m in mods for a in same):
        packed = torch.cat([m.packed for m in mods])
        if m0.granularity == "per_tensor":
            scale = torch.cat([m.scale.float().expand(m.out_features) for m in mods])
        else:
            scale = torch.cat([m.scale.float() for m in mods])
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias.float() if m.bias is not None else torch.zeros(m.out_features) for m in mods])
        backend = "reference" if m0.kernel == "reference" else "auto"
        return bind_linear(packed, scale, m0.in_features, m0.fmt, m0.act_bits, bias, m0._group, backend)
    if all(type(m) is nn.Linear for m in mods):
        w = torch.cat([m.weight.detach().float() for m in mods])
        b = None
        if any(m.bias is not None for m in mods):
            b = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                           for m in mods])
        return FloatLinear(w, b)
    parts = [_bind(m) for m in mods]
    return lambda x, out=None: torch.cat([f(x) for f in parts], dim=1, out=out) if out is not None else \
        torch.cat([f(x) for f in parts], dim=1)


def _nbytes(lin) -> int:
    ts = [getattr(lin, a, None) for a in ("packed", "scale", "bias", "w", "b")]
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# Per-architecture pieces, chosen once


class _Norm:
    """LayerNorm (weight, bias) or Hugging Face's LlamaRMSNorm (weight), float32, as a callable."""

    __slots__ = ("w", "b", "eps", "rms")

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        self.w = weight.detach().float().contiguous()
        self.rms = kind != "layernorm"
        self.b = None if self.rms else bias.detach().float().contiguous()
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:  # op for op what LlamaRMSNorm computes on float32 hidden states
            return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return F.layer_norm(x, (self.w.shape[0],), self.w, self.b, self.eps)


# ---------------------------------------------------------------------------------------------
# LM head


_HEAD_ROWS = 1024  # rows quantized at a time when building the int8 head


class _Head:
    """logits (M, V) float32 from the final hidden state (M, C); rows padded to 64 for the kernels.

    A head stored in the dtype it asks for (an fp16 checkpoint's tied embedding with head="fp16") is
    used as is, not copied."""

    def __init__(self, wte: torch.Tensor, kind: str, act_bits: Optional[int], scale: torch.Tensor | None = None):
        if kind == "auto":  # the storage the rows come in: no copy
            kind = "int8" if scale is not None else \
                {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(wte.dtype, "fp32")
        self.kind, self.act_bits, self.C = kind, act_bits, wte.shape[1]
        if scale is not None and kind == "int8":  # rows stored int8 with the canonical quantizer: read them as they are
            self.w, self.scale = pad_int8_rows(wte), scale.float().contiguous()
            self.bound = bind_int8_linear(self.w, self.scale, self.C, act_bits)
        elif scale is not None:  # int8 rows asked for as a float head: widen (the user's choice of storage)
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kind]
            w = torch.empty(wte.shape, dtype=dtype)
            for r in range(0, wte.shape[0], _HEAD_ROWS):
                w[r:r + _HEAD_ROWS] = (wte[r:r + _HEAD_ROWS].float() * scale[r:r + _HEAD_ROWS, None]).to(dtype)
            self.w, self.scale = pad_int8_rows(w), None
            self.bound = bind_float_rows(self.w, self.C)
        elif kind == "int8":
            from ternlm.config import Int8Config
            from ternlm.quant.int8 import quantize_int8

            # per-row absmax, a block of rows at a time: no full-size float temporaries of the table
            V, cfg = wte.shape[0], Int8Config("absmax", "per_channel")
            self.w = torch.zeros(V, int8_row_stride(self.C), dtype=torch.int8)  # rows padded like pad_int8_rows
            self.scale = torch.empty(V)
            for r in range(0, V, _HEAD_ROWS):
                t = quantize_int8(wte[r:r + _HEAD_ROWS], cfg)
                self.w[r:r + _HEAD_ROWS, :self.C] = t.q
                self.scale[r:r + _HEAD_ROWS] = t.scale.float()
            self.bound = bind_int8_linear(self.w, self.scale, self.C, act_bits)
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kind]
            self.w, self.scale = pad_int8_rows(wte.to(dtype)), None
            self.bound = bind_float_rows(self.w, self.C)

    @property
    def nbytes(self) -> int:
        n = self.w.shape[0] * self.C * self.w.element_size()
        return n + (self.scale.numel() * 4 if self.scale is not None else 0)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.bound(x, out)


# ---------------------------------------------------------------------------------------------
# Engine


class _Block:
    """One layer's bound pieces: norm1, qkv, o (attention), norm2, up, act, down (MLP)."""

    __slots__ = ("norm1", "qkv", "o", "norm2", "up", "act", "down", "scaling")


def _norm_of(mod: nn.Module) -> tuple:
    return mod.weight, getattr(mod, "bias", None)


def _parts_from_model(model: nn.Module, a: Arch, cfg: RuntimeConfig, max_seq_len: int) -> Parts:
    row = a.row
    wte, wte_scale = _rows_of(model.get_input_embeddings())  # stored dtype: rows widened per use
    head_w, head_scale = (wte, wte_scale) if a.tied_head else _rows_of(model.get_output_embeddings())
    wpe = cos = sin = None
    if row.pos_embed:
        wpe = model.get_submodule(row.pos_embed).weight.detach().float().contiguous()
    if a.positions == "rope":
        with torch.no_grad():  # RoPE table (max_seq_len, hs) from the model's own rotary module
            pid = torch.arange(max_seq_len).unsqueeze(0)
            rot = model.get_submodule(row.stack.rpartition(".")[0]).rotary_emb
            cos, sin = rot(torch.zeros(1, dtype=torch.float32), pid)
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
    blocks = []
    stack = model.get_submodule(row.stack)
    if a.mlp == "gated_silu":
        act = gated_silu(a.inner)
    elif cfg.gelu == "tanh" and model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh"):
        act = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    else:
        act = stack[0].get_submodule(row.down.path.rpartition(".")[0]).act  # the model's own module
    for blk in stack:
        get = blk.get_submodule
        blocks.append((_norm_of(get(row.norm1)), tuple(get(s.path) for s in row.qkv), get(row.o.path),
                       _norm_of(get(row.norm2)), tuple(get(s.path) for s in row.up), get(row.down.path),
                       a.head_dim ** -0.5))
    norm_f = _norm_of(model.get_submodule(row.final_norm))
    kind = act_kind(a, getattr(model.config, "activation_function", ""))
    return Parts(a, wte, head_w, wpe, norm_f, act, cos, sin, blocks, kind, wte_scale, head_scale)


class DecodeEngine:
    """Batch-1 prefill + decode for a GPT-2 or Llama-family HF model (see the module docstring)."""

    def __init__(self, model: nn.Module, config: RuntimeConfig | None = None):
        cfg = config or RuntimeConfig()
        a = describe(model)
        self._build(_parts_from_model(model, a, cfg, self._max_len(cfg, a)), cfg)

    @classmethod
    def from_checkpoint(cls, directory, config: RuntimeConfig | None = None) -> "DecodeEngine":
        """The engine straight from a ternlm checkpoint directory, without building the Hugging Face
        model: tensors are read one at a time and kept in their stored dtype (fp16 embeddings are not
        widened), so memory stays close to the file. Same results as ``DecodeEngine(ternlm.load(dir))``.
        A one-line TernlmError when the checkpoint is outside what this path reads
        (``ternlm.runtime.lean``); callers then build the model and use the constructor."""
        from ternlm.runtime.lean import parts_from_checkpoint, read_checkpoint

        cfg = config or RuntimeConfig()
        self = cls.__new__(cls)
        ck = read_checkpoint(directory)  # a directory, or a Checkpoint already read
        self._build(parts_from_checkpoint(ck, cfg, self._max_len(cfg, ck.arch)), cfg)
        return self

    @staticmethod
    def _max_len(cfg: RuntimeConfig, a: Arch) -> int:
        n = cfg.max_seq_len or a.max_positions
        if n > a.max_positions:
            raise TernlmError(f"max_seq_len {n} exceeds the model's {a.max_positions} positions")
        return n

    def _build(self, parts: Parts, cfg: RuntimeConfig) -> None:
        self.config = cfg
        self.arch = a = parts.arch
        self.n_layer, self.n_head, self.n_kv_head, self.hs = a.n_layer, a.n_head, a.n_kv_head, a.head_dim
        self.C, self.vocab_size = a.hidden, a.vocab_size
        self.max_seq_len = self._max_len(cfg, a)
        self.wte, self.wte_scale = parts.wte, parts.wte_scale
        self.head = _Head(parts.head_w, cfg.head, cfg.head_act_bits, parts.head_scale)
        self.wpe, self.cos, self.sin = parts.wpe, parts.cos, parts.sin
        self.norm_f = _Norm(a.norm, *parts.norm_f, a.norm_eps)
        self.blocks = [self._block(*blk[:5], parts.act, *blk[5:]) for blk in parts.blocks]

        # static state: KV cache (n_layer, n_kv_head, max_seq_len, head_dim) and the decode step's buffers
        shape = (self.n_layer, self.n_kv_head, self.max_seq_len, self.hs)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)
        self.pos = 0
        self._qdim = self.n_head * self.hs
        self._h = torch.empty(1, self.C)
        self._qkv = torch.empty(1, self._qdim + 2 * self.n_kv_head * self.hs)
        self._attn_out = torch.empty(1, self.C)
        self._y = torch.empty(self._qdim)
        self._up = torch.empty(1, a.inner * (2 if a.mlp == "gated_silu" else 1))
        self._logits = torch.empty(1, self.vocab_size)
        self._compiled = None
        if cfg.step != "python":
            why = self._compile_step(parts)
            if why and cfg.step == "compiled":
                raise TernlmError(f"the compiled decode step cannot run this model: {why}")
        self.step = "compiled" if self._compiled is not None else "python"

    def _compile_step(self, parts: Parts) -> str | None:
        """Build the compiled decode step over this engine's bindings and buffers (it keeps their
        pointers; the engine keeps the tensors). Returns why not, or None when built."""
        from ternlm.kernels import CompiledStep

        layers = [(b.norm1.w, b.norm1.b, b.norm2.w, b.norm2.b, b.scaling, b.qkv, b.o, b.up, b.down)
                  for b in self.blocks]
        why = CompiledStep.why_not(parts.act_kind, self.wte, self.head.bound, layers)
        if why:
            return why
        a = self.arch
        self._compiled = CompiledStep(
            hidden=self.C, n_head=self.n_head, n_kv_head=self.n_kv_head, head_dim=self.hs, inner=a.inner,
            max_len=self.max_seq_len, norm=a.norm, eps=a.norm_eps, act=parts.act_kind, wte=self.wte, wpe=self.wpe,
            cos=self.cos, sin=self.sin, k_cache=self.k_cache, v_cache=self.v_cache,
            norm_f=(self.norm_f.w, self.norm_f.b), head=self.head.bound, layers=layers, wte_scale=self.wte_scale)
        return None

    def _block(self, norm1, qkv, o, norm2, up, act, down, scaling) -> _Block:
        b = _Block()
        eps = self.arch.norm_eps
        b.norm1, b.norm2 = _Norm(self.arch.norm, *norm1, eps), _Norm(self.arch.norm, *norm2, eps)
        b.qkv, b.o, b.up, b.down = _bind(*qkv), _bind(o), _bind(*up), _bind(down)
        b.act, b.scaling = act, scaling
        return b

    # -- bookkeeping ---------------------------------------------------------------------------

    def weight_bytes(self) -> dict:
        """Bytes of weights a decode step reads: block linears, LM head, everything else."""
        lin = sum(_nbytes(f) for b in self.blocks for f in (b.qkv, b.o, b.up, b.down))
        other = (2 * self.n_layer + 1) * self.C * 4 * (2 if self.arch.norm == "layernorm" else 1)
        other += self.C * self.wte.element_size() + (self.C * 4 if self.wpe is not None else 0) + \
            (4 if self.wte_scale is not None else 0)
        return {"linears": lin, "head": self.head.nbytes, "other": other}

    # -- forward pieces ------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte[ids].float()
        if self.wte_scale is not None:
            h = h * self.wte_scale[ids].unsqueeze(-1)
        return h + self.wpe[: ids.numel()] if self.wpe is not None else h

    @torch.inference_mode()
    def prefill(self, ids, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt from an empty cache; logits of the last token (V,), or of every (T, V)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        T = ids.numel()
        if T < 1 or T > self.max_seq_len:
            raise TernlmError(f"prompt length {T} must be in [1, {self.max_seq_len}]")
        nh, nkv, hs = self.n_head, self.n_kv_head, self.hs
        h = self._embed(ids)  # (T, C)
        for i, b in enumerate(self.blocks):
            qkv = b.qkv(b.norm1(h))  # (T, (nh + 2 nkv) hs)
            q = qkv[:, : nh * hs].view(T, nh, hs).transpose(0, 1)  # (nh, T, hs)
            k, v = qkv[:, nh * hs:].view(T, 2, nkv, hs).permute(1, 2, 0, 3)  # 2 x (nkv, T, hs)
            if self.cos is not None:
                q, k = rope(q, self.cos[:T], self.sin[:T]), rope(k, self.cos[:T], self.sin[:T])
            self.k_cache[i, :, :T] = k
            self.v_cache[i, :, :T] = v
            if nkv != nh:
                k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
            y = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=T > 1,
                                               scale=b.scaling)  # (1, nh, T, hs)
            h = b.o(y[0].transpose(0, 1).reshape(T, nh * hs)) + h
            h = b.down(b.act(b.up(b.norm2(h)))) + h
        self.pos = T
        logits = self.head(self.norm_f(h if all_logits else h[-1:]))
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def decode_step(self, token: int) -> torch.Tensor:
        """Append one token at the current position; its next-token logits (V,) (a reused buffer)."""
        pos, token = self.pos, int(token)
        if pos >= self.max_seq_len:
            raise TernlmError(f"KV cache full ({self.max_seq_len} positions)")
        if not 0 <= token < self.vocab_size:
            raise TernlmError(f"token id {token} outside the vocabulary ({self.vocab_size})")
        if self._compiled is not None:
            self._compiled(token, pos, self._logits)
            self.pos = pos + 1
            return self._logits[0]
        h = self._h
        if self.wte_scale is not None:
            torch.mul(self.wte[token].float(), self.wte_scale[token], out=h[0])
        else:
            h[0].copy_(self.wte[token])
        if self.wpe is not None:
            h[0].add_(self.wpe[pos])
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[pos], self.sin[pos]
        kc, vc, nh = self.k_cache, self.v_cache, self.n_head
        for i, b in enumerate(self.blocks):
            qkv = b.qkv(b.norm1(h), self._qkv)  # (1, (nh + 2 nkv) hs)
            # RoPE + cache write + one-query (grouped-query) attention in one compiled call
            y = attn_decode(qkv.view(-1), kc[i], vc[i], pos, b.scaling, out=self._y, n_head=nh, cos=cos, sin=sin)
            h.add_(b.o(y.view(1, -1), self._attn_out))
            h.add_(b.down(b.act(b.up(b.norm2(h), self._up)), self._attn_out))
        self.pos = pos + 1
        return self.head(self.norm_f(h), self._logits)[0]

    @contextlib.contextmanager
    def decoding(self):
        """Run torch's own ops single-threaded while generating.

        NOTE: at one token every torch op here (LayerNorm, GELU, residual adds) is a few
        microseconds of work; parallelizing it only makes torch's OpenMP team wait at its barrier for
        a thread the kernels' pool is holding the other core with (ms per op on a busy 2-core VM).
        The GEMVs -- nearly all of a step's time, head included -- keep the kernels' pool and thread
        count.
        """
        from ternlm.kernels import pin_num_threads

        prev = torch.get_num_threads()
        with pin_num_threads():  # the kernels keep the thread count they had
            torch.set_num_threads(1)
            try:
                yield self
            finally:
                torch.set_num_threads(prev)

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, ids, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> dict:
        """Prefill + decode. Greedy when temperature is 0; else temperature -> top-k -> top-p
        filtering (HF's order) and multinomial sampling from a generator seeded with ``seed``.

        Returns {tokens, n_prompt_tokens, n_new_tokens, prefill_seconds, decode_seconds,
        prefill_tok_s, decode_tok_s}; the first new token comes from the prefill's logits, so
        decode time covers the remaining n_new_tokens - 1 steps.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if max_new_tokens < 1:
            raise TernlmError("max_new_tokens must be >= 1")
        if ids.numel() + max_new_tokens - 1 > self.max_seq_len:
            raise TernlmError(f"prompt ({ids.numel()}) + max_new_tokens ({max_new_tokens}) exceeds "
                              f"max_seq_len ({self.max_seq_len})")
        pick = make_sampler(temperature, top_k, top_p, seed)
        with self.decoding():
            t0 = time.perf_counter()
            tok = pick(self.prefill(ids))
            t1 = time.perf_counter()
            out = [tok]
            if on_token is not None:
                on_token(tok)
            while len(out) < max_new_tokens and tok != eos_token_id:
                tok = pick(self.decode_step(tok))
                out.append(tok)
                if on_token is not None:
                    on_token(tok)
            t2 = time.perf_counter()
        n_dec = len(out) - 1
        return {"tokens": out, "n_prompt_tokens": int(ids.numel()), "n_new_tokens": len(out),
                "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                "prefill_tok_s": ids.numel() / (t1 - t0),
                "decode_tok_s": n_dec / (t2 - t1) if n_dec and t2 > t1 else None}

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Next-token logits (1, T, V) of a whole sequence from an empty cache, so the engine (with its
        LM-head storage) plugs into ``ternlm.eval.perplexity.perplexity`` as a scorer."""
        return self.prefill(torch.as_tensor(ids, dtype=torch.long).reshape(-1), all_logits=True).unsqueeze(0)

    def profile(self, ids, steps: int = 32) -> dict:
        """Where a decode step's time goes: best-of-``steps`` ms per token for the whole step, the
        block linears and the LM head (other = step - linears - head: norms, attention, glue)."""
        from ternlm.timing import time_calls

        def best(fn):
            return min(time_calls(fn, warmup=1, min_calls=steps)) * 1e3

        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        with self.decoding(), torch.inference_mode():
            self.prefill(ids)
            step = best(lambda: (self.decode_step(1), setattr(self, "pos", ids.numel())))
            h = torch.randn(1, self.C)
            y, a = torch.randn(1, self._qdim), torch.randn(1, self.arch.inner)

            def linears():
                for b in self.blocks:
                    b.qkv(h, self._qkv)
                    b.o(y, self._attn_out)
                    b.up(h, self._up)
                    b.down(a, self._attn_out)
            lin = best(linears)
            head = best(lambda: self.head(h, self._logits))
        return {"step_ms": step, "block_linears_ms": lin, "head_ms": head, "other_ms": max(0.0, step - lin - head),
                "note": "best-of-N per component; other = step - linears - head"}


GPT2Runtime = DecodeEngine  # the engine's first name, kept for callers


def make_sampler(temperature: float, top_k: int, top_p: float, seed: int) -> Callable[[torch.Tensor], int]:
    """logits (V,) -> a token: greedy at temperature 0, else temperature -> top-k -> top-p (HF's order)
    and a multinomial draw from a generator seeded with ``seed``."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return lambda logits: int(logits.argmax())
    gen = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> int:
        x = logits.float() / temperature
        if top_k:
            kth = torch.topk(x, min(top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if top_p < 1:
            srt, idx = torch.sort(x, descending=False)
            cum = srt.softmax(-1).cumsum(-1)
            drop = cum <= 1 - top_p
            drop[-1] = False  # always keep the most likely token
            x = x.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
        return int(torch.multinomial(x.softmax(-1), 1, generator=gen))
    return pick
