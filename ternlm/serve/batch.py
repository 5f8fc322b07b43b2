"""Several sequences decoding together on one decode engine: the server's batch engine.

Each slot has its own KV cache (n_layer, n_kv_head, ctx, head_dim). One decode step takes one token from
every active slot and runs them through each layer as one small batch (the block linears as one
(slots, hidden) GEMM on the packed kernels), attention per slot over its own cache. A prompt is
prefilled into its slot in chunks (``prefill``: a chunk attends to the slot's earlier tokens and
causally to itself), so the scheduler can interleave a long prompt with the other slots' decode steps.

Built on ``ternlm.runtime.DecodeEngine`` (its bound linears, norms, embeddings, RoPE tables and head):
the same architectures (``ternlm.arch``), the same kernels, a Python step over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ternlm.errors import TernlmError
from ternlm.kernels import attn_decode_batch, rope


class BatchEngine:
    """``slots`` KV caches of ``ctx`` positions over a ``DecodeEngine``'s weights."""

    def __init__(self, engine, slots: int, ctx: int):
        if slots < 1:
            raise TernlmError(f"slots must be >= 1, got {slots}")
        if not 2 <= ctx <= engine.max_seq_len:
            raise TernlmError(f"ctx must be in [2, {engine.max_seq_len}] (the engine's max_seq_len), got {ctx}")
        self.e = engine
        self.slots, self.ctx = slots, ctx
        e = engine
        shape = (slots, e.n_layer, e.n_kv_head, ctx, e.hs)  # slot s's cache is k[s], v[s]
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.pos = [0] * slots  # tokens held in each slot's cache

    @property
    def vocab_size(self) -> int:
        return self.e.vocab_size

    @property
    def kv_bytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * 4

    def reset(self, slot: int) -> None:
        self.pos[slot] = 0

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        e = self.e
        h = e.wte[ids].float()
        if e.wte_scale is not None:
            h = h * e.wte_scale[ids].unsqueeze(-1)
        if e.wpe is not None:
            h = h + e.wpe[positions]
        return h

    @torch.inference_mode()
    def prefill(self, slot: int, ids) -> torch.Tensor:
        """Append ``ids`` (T,) to ``slot``'s cache; the next-token logits (V,) after the last of them."""
        e = self.e
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        T, p0 = ids.numel(), self.pos[slot]
        if T < 1 or p0 + T > self.ctx:
            raise TernlmError(f"{p0} + {T} tokens do not fit the slot's {self.ctx}-token context")
        nh, nkv, hs = e.n_head, e.n_kv_head, e.hs
        h = self._embed(ids, torch.arange(p0, p0 + T))  # (T, C)
        if p0:  # the chunk attends to all earlier tokens and causally to itself
            mask = torch.ones(T, p0 + T, dtype=torch.bool).tril_(p0)
        kc, vc = self.k[slot], self.v[slot]
        for i, b in enumerate(e.blocks):
            qkv = b.qkv(b.norm1(h))  # (T, (nh + 2 nkv) hs)
            q = qkv[:, : nh * hs].view(T, nh, hs).transpose(0, 1)  # (nh, T, hs)
            k, v = qkv[:, nh * hs:].view(T, 2, nkv, hs).permute(1, 2, 0, 3)  # 2 x (nkv, T, hs)
            if e.cos is not None:
                cos, sin = e.cos[p0:p0 + T], e.sin[p0:p0 + T]
                q, k = rope(q, cos, sin), rope(k, cos, sin)
            kc[i, :, p0:p0 + T] = k
            vc[i, :, p0:p0 + T] = v
            K, V = kc[i, :, : p0 + T], vc[i, :, : p0 + T]
            if nkv != nh:
                K, V = K.repeat_interleave(nh // nkv, 0), V.repeat_interleave(nh // nkv, 0)
            if p0:
                y = F.scaled_dot_product_attention(q[None], K[None], V[None], attn_mask=mask, scale=b.scaling)
            else:  # what the single-sequence engine computes for a whole prompt
                y = F.scaled_dot_product_attention(q[None], K[None], V[None], is_causal=T > 1, scale=b.scaling)
            h = b.o(y[0].transpose(0, 1).reshape(T, nh * hs)) + h
            h = b.down(b.act(b.up(b.norm2(h)))) + h
        self.pos[slot] = p0 + T
        return e.head(e.norm_f(h[-1:]))[0]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for each of ``slots``: logits (len(slots), V), row j for slots[j]."""
        e = self.e
        S = len(slots)
        for s in slots:
            if self.pos[s] >= self.ctx:
                raise TernlmError(f"slot {s}'s KV cache is full ({self.ctx} positions)")
        ids = torch.tensor(tokens, dtype=torch.long)
        pos = [self.pos[s] for s in slots]
        positions = torch.tensor(pos, dtype=torch.long)
        h = self._embed(ids, positions)  # (S, C)
        nh, hs = e.n_head, e.hs
        y = torch.empty(S, nh * hs)
        for i, b in enumerate(e.blocks):
            qkv = b.qkv(b.norm1(h))  # (S, (nh + 2 nkv) hs): one GEMM for every slot
            # every slot's attention over its own cache in one call
            attn_decode_batch(qkv, self.k, self.v, slots, pos, b.scaling, layer=i, n_head=nh, cos=e.cos,
                              sin=e.sin, out=y)
            h = h + b.o(y)
            h = h + b.down(b.act(b.up(b.norm2(h))))
        for s in slots:
            self.pos[s] += 1
        return e.head(e.norm_f(h))
