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
    linears = [n for n, m in block.named_modules() if n and is_linear_like(m)]
    llama = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    gpt2 = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    if _has(block, *llama) and set(linears) == {n for n in llama if "proj" in n}:
        attn = block.self_attn
        hd = attn.head_dim
        n_kv = get_weight(attn.k_proj).shape[0] // hd
        n_h = get_weight(attn.q_proj).shape[0] // hd
        rep = n_h // n_kv
        # o column (head h, dim d) reads v row (kv head h // rep, dim d)
        cols = torch.arange(n_h * hd)
        o_map = (cols // hd // rep) * hd + cols % hd
        inter = get_weight(block.mlp.up_proj).shape[0]
        return BlockSpec("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                   ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
                         [NormMigration("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                          RowMigration("self_attn.v_proj", torch.arange(n_kv * hd), "self_attn.o_proj", o_map),
                          NormMigration("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                          RowMigration("mlp.up_proj", torch.arange(inter), "mlp.down_proj", torch.arange(inter))])
    if _has(block, *gpt2) and set(linears) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}:
        e = get_weight(block.attn.c_proj).shape[1]
        return BlockSpec("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
                         [NormMigration("ln_1", ["attn.c_attn"]),
                          RowMigration("attn.c_attn", torch.arange(2 * e, 3 * e), "attn.c_proj", torch.arange(e)),
                          NormMigration("ln_2", ["mlp.c_fc"])])
    return BlockSpec("generic", [[n] for n in linears])
