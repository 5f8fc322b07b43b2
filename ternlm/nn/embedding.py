"""Token embedding and LM head over rows kept in their stored dtype: int8 with one float32 scale per
row (the canonical int8 absmax quantizer, per row), or fp16 / bf16 / fp32.

A checkpoint's embedding table is the largest float tensor of a small model (SmolLM2-135M: 28.3M of
its 134.5M parameters). ``RowEmbedding`` looks rows up without widening the table: a token's row is
dequantized (int8) or cast (fp16) when it is read, and the output is float32. ``RowHead`` computes
the logits from the same rows with the compiled kernels (int8 rows: W8A16 or W8A8; float rows: the
float-rows GEMV/GEMM), so a tied head costs no second copy. Rows are padded to a multiple of 64
weights for the kernels only when the width is not one already (GPT-2's 768 and SmolLM2's 576 are).

Both are inference modules. ``float_embeddings(model)`` swaps them back for plain float32
``nn.Embedding`` / ``nn.Linear`` (tied again when they were tied) before training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ternlm.errors import TernlmError

ROW_DTYPES = {"int8": torch.int8, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_CHUNK = 8192  # rows dequantized at a time where no kernel applies
# NOTE: the row kernels are GEMVs (one token: decode); from this many positions on (prefill, scoring),
# widening a block of rows at a time and calling torch's GEMM is faster (measured: 64-512 positions x
# 49,152 fp16 / int8 rows of 576, two threads).
GEMM_ROWS = 64


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale per row) from a float (V, C) table: the canonical int8 absmax
    quantizer per row, a block of rows at a time (no full-size float temporary)."""
    blocks = ((r, weight[r:r + _CHUNK]) for r in range(0, weight.shape[0], _CHUNK))
    return quantize_row_blocks(tuple(weight.shape), blocks)


def quantize_row_blocks(shape: tuple, blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` of a (V, C) table given as ``(first_row, rows)`` blocks that cover it in
    order (read from disk a block at a time by streaming quantization). Rows are independent, so
    the result does not depend on where the blocks are cut."""
    from ternlm.config import Int8Config
    from ternlm.quant.int8 import quantize_int8

    cfg = Int8Config("absmax", "per_channel")
    q = torch.empty(shape, dtype=torch.int8)
    scale = torch.empty(shape[0], dtype=torch.float32)
    done = 0
    for r0, rows in blocks:
        if r0 != done:
            raise TernlmError(f"internal: row blocks out of order ({r0}, expected {done})")
        for r in range(0, rows.shape[0], _CHUNK):
            t = quantize_int8(rows[r:r + _CHUNK].float(), cfg)
            q[r0 + r:r0 + r + t.q.shape[0]] = t.q
            scale[r0 + r:r0 + r + t.q.shape[0]] = t.scale.float().reshape(-1)
        done = r0 + rows.shape[0]
    if done != shape[0]:
        raise TernlmError(f"internal: row blocks cover {done} of {shape[0]} rows")
    return q, scale


class _Rows(nn.Module):
    """Rows in their stored dtype: ``int8`` (buffers ``qweight`` (V, C) int8 and ``scale`` (V,)
    float32) or a float dtype name (buffer ``weight`` in that dtype)."""

    def __init__(self, num_rows: int, width: int, kind: str):
        super().__init__()
        if kind not in ROW_DTYPES:
            raise TernlmError(f"unknown row storage {kind!r}; choose one of {', '.join(ROW_DTYPES)}")
        self.kind = kind
        if kind == "int8":
            self.register_buffer("qweight", torch.empty(num_rows, width, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(num_rows, dtype=torch.float32))
        else:
            self.register_buffer("weight", torch.empty(num_rows, width, dtype=ROW_DTYPES[kind]))

    def _fill(self, weight: torch.Tensor) -> None:
        if self.kind == "int8":
            self.qweight, self.scale = quantize_rows(weight.detach())
        else:
            self.weight = weight.detach().to(ROW_DTYPES[self.kind]).contiguous()

    @property
    def rows(self) -> torch.Tensor:
        """The stored rows (int8 or float)."""
        return self.qweight if self.kind == "int8" else self.weight

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) as float32 (default: the whole table)."""
        if self.kind == "int8":
            return self.qweight[start:stop].float() * self.scale[start:stop, None]
        return self.weight[start:stop].float()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))


class RowEmbedding(_Rows):
    """nn.Embedding over stored rows (see ``_Rows``); the output is float32."""

    def __init__(self, num_embeddings: int, embedding_dim: int, kind: str = "fp16", padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, kind)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_float(cls, weight: torch.Tensor, kind: str, padding_idx: int | None = None) -> "RowEmbedding":
        with torch.device("meta"):
            m = cls(weight.shape[0], weight.shape[1], kind, padding_idx)
        m._fill(weight)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)
        return self.weight[ids].float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows={self.kind}"


class RowHead(_Rows):
    """The LM head over stored rows: its own (untied; buffers as ``_Rows``) or a ``RowEmbedding``'s
    (``tied_to``; nothing registered here, so the rows are saved once, with the embedding). Logits
    are float32. ``act_bits`` for int8 rows: None keeps the hidden state float (W8A16, the default),
    8 quantizes it per token (W8A8)."""

    def __init__(self, in_features: int, out_features: int, kind: str = "fp16", *,
                 tied_to: RowEmbedding | None = None, act_bits: int | None = None):
        if act_bits not in (None, 8):
            raise TernlmError(f"act_bits must be None or 8, got {act_bits!r}")
        if tied_to is not None:
            nn.Module.__init__(self)
            self.kind = tied_to.kind
            object.__setattr__(self, "_src", tied_to)  # not a submodule: saved once, with the embedding
        else:
            super().__init__(out_features, in_features, kind)
            object.__setattr__(self, "_src", self)
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        self._bound = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, kind: str, act_bits: int | None = None) -> "RowHead":
        with torch.device("meta"):
            m = cls(weight.shape[1], weight.shape[0], kind, act_bits=act_bits)
        m._fill(weight)
        return m

    @property
    def tied(self) -> bool:
        return self._src is not self

    @property
    def rows(self) -> torch.Tensor:
        return self._src.qweight if self.kind == "int8" else self._src.weight

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return _Rows.dequantize(self._src, start, stop)

    def _bind(self):
        from ternlm.kernels import bind_float_rows, bind_int8_linear, int8_row_stride

        rows = self.rows
        key = (rows.data_ptr(), rows.device, self.act_bits)
        if self._bound is not None and self._bound[0] == key:
            return self._bound[1]
        fn = None
        if rows.device.type == "cpu" and rows.is_contiguous() and int8_row_stride(self.in_features) == self.in_features:
            if self.kind == "int8":
                fn = bind_int8_linear(rows, self._src.scale, self.in_features, self.act_bits)
            else:
                fn = bind_float_rows(rows, self.in_features)
        self._bound = (key, fn)
        return fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp32":  # exactly what nn.Linear computes
            return F.linear(x.float(), self._src.weight)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        fn = self._bind() if x2.shape[0] < GEMM_ROWS else None
        if fn is not None:
            y = fn(x2)
        else:  # many rows (a GEMM's work), or no kernel here: the rows as float, a block at a time
            if self.kind == "int8" and self.act_bits == 8:
                from ternlm.quant.activations import fake_quantize_activations

                x2 = fake_quantize_activations(x2, 8)
            y = torch.empty(x2.shape[0], self.out_features, device=x2.device)
            for s in range(0, self.out_features, _CHUNK):
                y[:, s:s + _CHUNK] = F.linear(x2, self.dequantize(s, s + _CHUNK))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "" if self.kind != "int8" else f", W8A{self.act_bits or 16}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.kind}{act}" + \
            (", tied" if self.tied else "")


def row_modules(model: nn.Module) -> tuple[RowEmbedding | None, RowHead | None]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (emb if isinstance(emb, RowEmbedding) else None, head if isinstance(head, RowHead) else None)


def float_embeddings(model: nn.Module) -> nn.Module:
    """Swap ``RowEmbedding`` / ``RowHead`` for float32 ``nn.Embedding`` / ``nn.Linear`` (tied again when
    they were tied), in place; returns the model. For training, which needs float parameters."""
    emb, head = row_modules(model)
    if emb is None and head is None:
        return model
    if emb is not None:
        e = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx,
                         _weight=emb.dequantize().contiguous())
        model.set_input_embeddings(e)
    if head is not None:
        lin = nn.Linear(head.in_features, head.out_features, bias=False)
        if head.tied and emb is not None:
            lin.weight = model.get_input_embeddings().weight
        else:
            lin.weight = nn.Parameter(head.dequantize().contiguous())
        model.set_output_embeddings(lin)
    return model
