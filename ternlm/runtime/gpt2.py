"""A lean batch-1 decode engine for GPT-2-architecture models (ternary or float block linears).

Built from a Hugging Face ``GPT2LMHeadModel`` whose block linears are ``TernaryLinear`` (after
``ternlm.conversion``) or plain Conv1D / nn.Linear. What it removes from the per-token path, compared
with ``model.generate``: the cache object, mask construction, logits processors and module-call
overhead. What it keeps is the model's math, op for op, so greedy tokens equal HF's:

    prefill(ids)      all prompt tokens at once (GEMM kernels, causal SDPA), fills the KV cache
    decode_step(tok)  one token: 12 x (LN, qkv, fused cache write + attention (attn_decode), proj,
                      LN, fc, GELU, proj)
    generate(ids)     prefill + decode loop + sampling, timed

Every linear layer is a kernel binding made once at construction (``ternlm.kernels.bind_linear``
for packed ternary layers, ``bind_int8_linear`` / ``bind_float_rows`` for the head); per token
they write into buffers allocated once. The KV cache is a static pair of
(n_layer, 1, n_head, max_seq_len, head_dim) tensors. The LM head (tied to ``wte``, 38.6M weights for
GPT-2 small -- most of the bytes a token touches) can be kept fp32, stored fp16/bf16, or quantized
to int8 rows (per-row absmax) run by the W8A8 or W8A16 GEMV kernel.
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
from ternlm.kernels import attn_decode, bind_float_rows, bind_int8_linear, pad_int8_rows

__all__ = ["GPT2Runtime", "RuntimeConfig", "HEADS"]


@dataclass
class RuntimeConfig:
    """head: LM-head weight storage. head_act_bits: for the int8 head, 8 quantizes the final
    hidden state per token (W8A8, integer dot products) and None keeps it float (W8A16).
    max_seq_len: KV-cache length (default: the model's n_positions).
    gelu: ``model`` calls the model's own activation module (HF's gelu_new, seven elementwise ops,
    bitwise what HF computes); ``tanh`` is the same formula as one fused op (rounding differs by
    ~1 ulp, four times faster on a 3072-wide row)."""

    head: str = "fp32"
    head_act_bits: Optional[int] = 8
    max_seq_len: Optional[int] = None
    gelu: str = "model"

    def __post_init__(self):
        if self.head not in HEADS:
            raise TernlmError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.head_act_bits not in (8, None):
            raise TernlmError(f"head_act_bits must be 8 or None, got {self.head_act_bits!r}")
        if self.gelu not in ("model", "tanh"):
            raise TernlmError(f"gelu must be 'model' or 'tanh', got {self.gelu!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise TernlmError("max_seq_len must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Linear layers as plain callables: lin(x (M, K), out (M, N) or None) -> (M, N) float32


def _ternary_call(m) -> Callable:
    """A TernaryLinear's kernel binding (compiled, Triton or reference, chosen once)."""
    return m.bind()


def _float_call(m: nn.Module) -> Callable:
    if isinstance(m, nn.Linear):
        w, b = m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()
        return lambda x, out=None: F.linear(x, w, b)
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, Conv1D):  # weight (in, out): Conv1D's own addmm, so results match HF bit for bit
        w, b = m.weight.detach().float(), m.bias.detach().float()
        return lambda x, out=None: torch.addmm(b, x, w) if out is None else torch.addmm(b, x, w, out=out)
    return lambda x, out=None: m(x)


def _linear_call(m: nn.Module) -> Callable:
    from ternlm.nn.ternary_linear import TernaryLinear

    return _ternary_call(m) if isinstance(m, TernaryLinear) else _float_call(m)


def _out_features(m: nn.Module) -> int:
    if hasattr(m, "out_features"):
        return m.out_features
    return m.weight.shape[1]  # Conv1D: (in, out)


# ---------------------------------------------------------------------------------------------
# LM head


class _Head:
    """logits (M, V) float32 from the final hidden state (M, C); rows padded to 64 for the kernels."""

    def __init__(self, wte: torch.Tensor, kind: str, act_bits: Optional[int]):
        self.kind, self.act_bits, self.C = kind, act_bits, wte.shape[1]
        if kind == "int8":
            from ternlm.config import Int8Config
            from ternlm.quant.int8 import quantize_int8

            t = quantize_int8(wte, Int8Config("absmax", "per_channel"))
            self.w, self.scale = pad_int8_rows(t.q), t.scale.float().contiguous()
            self._call = bind_int8_linear(self.w, self.scale, self.C, act_bits)
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kind]
            self.w, self.scale = pad_int8_rows(wte.to(dtype)), None
            self._call = bind_float_rows(self.w, self.C)

    @property
    def nbytes(self) -> int:
        n = self.w.shape[0] * self.C * self.w.element_size()
        return n + (self.scale.numel() * 4 if self.scale is not None else 0)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(x, out)


# ---------------------------------------------------------------------------------------------
# Engine


class _Block:
    __slots__ = ("ln1", "ln2", "qkv", "proj", "fc", "mproj", "scaling")


class GPT2Runtime:
    """Batch-1 prefill + decode for a GPT-2-architecture HF model (see the module docstring)."""

    def __init__(self, model: nn.Module, config: RuntimeConfig | None = None):
        cfg = config or RuntimeConfig()
        self.config = cfg
        tr = getattr(model, "transformer", None)
        hc = model.config
        if tr is None or getattr(hc, "model_type", None) != "gpt2":
            raise TernlmError(f"GPT2Runtime needs a GPT2LMHeadModel, got {type(model).__name__}")
        if getattr(hc, "add_cross_attention", False) or getattr(hc, "reorder_and_upcast_attn", False):
            raise TernlmError("GPT2Runtime does not support cross-attention or reorder_and_upcast_attn")
        self.n_layer, self.n_head, self.C = hc.n_layer, hc.n_head, hc.n_embd
        self.hs = self.C // self.n_head
        self.eps = hc.layer_norm_epsilon
        self.max_seq_len = cfg.max_seq_len or hc.n_positions
        if self.max_seq_len > hc.n_positions:
            raise TernlmError(f"max_seq_len {self.max_seq_len} exceeds the model's n_positions {hc.n_positions}")
        self.wte = tr.wte.weight.detach().float().contiguous()
        self.wpe = tr.wpe.weight.detach().float().contiguous()
        self.vocab_size = self.wte.shape[0]
        lm_head = model.get_output_embeddings()
        if lm_head is not None and lm_head.weight.data_ptr() != tr.wte.weight.data_ptr():
            head_w = lm_head.weight.detach().float().contiguous()  # untied head
        else:
            head_w = self.wte
        self.head = _Head(head_w, cfg.head, cfg.head_act_bits)
        if cfg.gelu == "tanh" and hc.activation_function in ("gelu_new", "gelu_pytorch_tanh"):
            self.act = lambda x: F.gelu(x, approximate="tanh")
        else:
            self.act = tr.h[0].mlp.act
        self.lnf = (tr.ln_f.weight.detach().float(), tr.ln_f.bias.detach().float())

        self.blocks = []
        for blk in tr.h:
            b = _Block()
            b.ln1 = (blk.ln_1.weight.detach().float(), blk.ln_1.bias.detach().float())
            b.ln2 = (blk.ln_2.weight.detach().float(), blk.ln_2.bias.detach().float())
            b.qkv, b.proj = _linear_call(blk.attn.c_attn), _linear_call(blk.attn.c_proj)
            b.fc, b.mproj = _linear_call(blk.mlp.c_fc), _linear_call(blk.mlp.c_proj)
            b.scaling = blk.attn.scaling
            self.blocks.append(b)
        self._linear_modules = [(blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj) for blk in tr.h]
        inner = _out_features(tr.h[0].mlp.c_fc)

        # static state: KV cache (n_layer, 1, n_head, max_seq_len, head_dim) and the decode step's buffers
        shape = (self.n_layer, 1, self.n_head, self.max_seq_len, self.hs)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)
        self.pos = 0
        self._h = torch.empty(1, self.C)
        self._qkv = torch.empty(1, 3 * self.C)
        self._attn_out = torch.empty(1, self.C)
        self._y = torch.empty(self.C)
        self._fc = torch.empty(1, inner)
        self._logits = torch.empty(1, self.vocab_size)

    # -- bookkeeping ---------------------------------------------------------------------------

    def weight_bytes(self) -> dict:
        """Bytes of weights a decode step reads: block linears, LM head, everything else."""
        lin = 0
        for mods in self._linear_modules:
            for m in mods:
                for t in m.buffers() if hasattr(m, "packed") else m.parameters():
                    lin += t.numel() * t.element_size()
        other = sum(t.numel() * 4 for b in self.blocks for t in (*b.ln1, *b.ln2)) + self.C * 4 * 3
        return {"linears": lin, "head": self.head.nbytes, "other": other}

    # -- forward pieces ------------------------------------------------------------------------

    def _layer_norm(self, x, wb):
        return F.layer_norm(x, (self.C,), wb[0], wb[1], self.eps)

    @torch.inference_mode()
    def prefill(self, ids, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt from an empty cache; logits of the last token (V,), or of every (T, V)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        T = ids.numel()
        if T < 1 or T > self.max_seq_len:
            raise TernlmError(f"prompt length {T} must be in [1, {self.max_seq_len}]")
        nh, hs = self.n_head, self.hs
        h = self.wte[ids] + self.wpe[:T]  # (T, C)
        for i, b in enumerate(self.blocks):
            qkv = b.qkv(self._layer_norm(h, b.ln1))  # (T, 3C)
            q, k, v = qkv.view(T, 3, nh, hs).permute(1, 2, 0, 3).unsqueeze(1)  # 3 x (1, nh, T, hs)
            self.k_cache[i, :, :, :T] = k
            self.v_cache[i, :, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=b.scaling)  # (1, nh, T, hs)
            h = b.proj(y.transpose(1, 2).reshape(T, self.C)) + h
            h = b.mproj(self.act(b.fc(self._layer_norm(h, b.ln2)))) + h
        self.pos = T
        x = self._layer_norm(h if all_logits else h[-1:], self.lnf)
        logits = self.head(x)
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def decode_step(self, token: int) -> torch.Tensor:
        """Append one token at the current position; its next-token logits (V,) (a reused buffer)."""
        pos = self.pos
        if pos >= self.max_seq_len:
            raise TernlmError(f"KV cache full ({self.max_seq_len} positions)")
        C = self.C
        h = torch.add(self.wte[token], self.wpe[pos], out=self._h[0]).view(1, C)
        kc, vc = self.k_cache, self.v_cache
        for i, b in enumerate(self.blocks):
            qkv = b.qkv(self._layer_norm(h, b.ln1), self._qkv)  # (1, 3C)
            # cache write + one-query attention in one call (torch: two slice copies + SDPA)
            y = attn_decode(qkv.view(3 * C), kc[i, 0], vc[i, 0], pos, b.scaling, out=self._y)  # (C,)
            h.add_(b.proj(y.view(1, C), self._attn_out))
            h.add_(b.mproj(self.act(b.fc(self._layer_norm(h, b.ln2), self._fc)), self._attn_out))
        self.pos = pos + 1
        return self.head(self._layer_norm(h, self.lnf), self._logits)[0]

    @contextlib.contextmanager
    def decoding(self):
        """Run torch's own ops single-threaded while generating.

        NOTE: at one token every torch op here (LayerNorm, GELU, residual adds) is a few
        microseconds of work; parallelizing it only makes torch's OpenMP team wait at its barrier for
        a thread the kernels' pool is holding the other core with (ms per op on a busy 2-core VM).
        The GEMVs -- nearly all of a step's time, head included -- keep the kernels' pool and thread
        count.
        """
        prev = torch.get_num_threads()
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
        pick = _sampler(temperature, top_k, top_p, seed)
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
            h, f = torch.randn(1, self.C), torch.randn(1, self._fc.shape[1])

            def linears():
                for b in self.blocks:
                    b.qkv(h, self._qkv)
                    b.proj(h, self._attn_out)
                    b.fc(h, self._fc)
                    b.mproj(f, self._attn_out)
            lin = best(linears)
            head = best(lambda: self.head(h, self._logits))
        return {"step_ms": step, "block_linears_ms": lin, "head_ms": head, "other_ms": max(0.0, step - lin - head),
                "note": "best-of-N per component; other = step - linears - head"}


def _sampler(temperature: float, top_k: int, top_p: float, seed: int) -> Callable[[torch.Tensor], int]:
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
