"""What a transformer block looks like to PTQ: its linear layers, which share an input, and
which per-channel scales can migrate between layers without changing the function.

Two families are known (chosen once per block from its modules, llama.cpp-style):

    llama  input_layernorm -> q,k,v -> o ; post_attention_layernorm -> gate,up -> down
           (RMSNorm; v -> o with grouped-query heads; up -> down through the SiLU gate product)
    gpt2   ln_1 -> c_attn -> c_proj ; ln_2 -> c_fc -> (GELU) -> c_proj
           (LayerNorm with bias; Conv1D weights stored (in, out); v -> c_proj)

Any other block gets every linear layer quantized with its own input and no migration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ternlm.nn.bitlinear import is_linear_like


@dataclass
class NormMigration:
    """norm(x) feeds ``linears`` only: norm weight (and bias) / s, linear input columns * s."""

    norm: str
    linears: list


@dataclass
class RowMigration:
    """Rows ``rows`` of ``producer`` feed ``consumer``'s input columns linearly (through attention
    or a gate product): producer rows (and bias) / s, consumer column c * s[col_map[c]]."""

    producer: str
    rows: torch.Tensor  # (k,) row indices in the producer's (out, in) weight
    consumer: str
    col_map: torch.Tensor  # (consumer in,) index into s for each consumer column


@dataclass
class BlockSpec:
    kind: str
    groups: list  # lists of linear names sharing one input, in forward order
    migrations: list = field(default_factory=list)


def get_weight(m: nn.Module) -> torch.Tensor:
    """(out, in) float32 copy of an nn.Linear / Conv1D weight."""
    w = m.weight.detach()
    return (w if isinstance(m, nn.Linear) else w.t()).float().clone()


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) weight back in the module's own layout."""
    with torch.no_grad():
        m.weight.copy_(w if isinstance(m, nn.Linear) else w.t())


def _has(block: nn.Module, *names: str) -> bool:
    return all(_get(block, n) is not None for n in names)


def _get(block: nn.Module, name: str):
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def block_spec(block: nn.Module, config=None) -> BlockSpec:
    """The block's layout from the architecture table (``ternlm.arch``): the row whose slots are exactly
    the block's linear layers gives the groups (linears sharing an input, in forward order) and the
    scale migrations; any other block gets every linear on its own, with no migration."""
    from ternlm.arch import ROWS

    linears = [n for n, m in block.named_modules() if n and is_linear_like(m)]
    for row in ROWS.values():
        names = [s.path for s in row.linears]
        if set(linears) != set(names) or not _has(block, row.norm1, row.norm2):
            continue
        groups = [[s.path for s in row.qkv], [row.o.path], [s.path for s in row.up], [row.down.path]]
        return BlockSpec(row.model_type, groups, [_migration(block, row, m) for m in row.migrations()])
    return BlockSpec("generic", [[n] for n in linears])


def _migration(block: nn.Module, row, m: tuple):
    kind, src, dst = m
    if kind == "norm":
        return NormMigration(src, list(dst))
    if kind == "up_to_down":
        inter = get_weight(block.get_submodule(src)).shape[0]
        return RowMigration(src, torch.arange(inter), dst, torch.arange(inter))
    # v_to_o: v's rows scale o's columns through attention (grouped-query heads share a v head)
    o_in = get_weight(block.get_submodule(dst)).shape[1]
    if row.fused_qkv:  # GPT-2's c_attn: v is the last third of the rows
        return RowMigration(src, torch.arange(2 * o_in, 3 * o_in), dst, torch.arange(o_in))
    attn = block.get_submodule(row.o.path.rpartition(".")[0])
    hd = attn.head_dim
    n_kv = get_weight(block.get_submodule(src)).shape[0] // hd
    n_h = o_in // hd
    rep = n_h // n_kv
    cols = torch.arange(n_h * hd)  # o column (head h, dim d) reads v row (kv head h // rep, dim d)
    return RowMigration(src, torch.arange(n_kv * hd), dst, (cols // hd // rep) * hd + cols % hd)


