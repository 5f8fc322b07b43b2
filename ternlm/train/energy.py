"""Arithmetic energy of the matmuls per token, from a model's linear shapes.

Per-operation energies in pJ (Horowitz, ISSCC 2014, 45 nm; the 7 nm column is the table the
BitNet papers use). There is no int4 figure: W1.58A4 is charged the int8 add (an upper bound).

    E_token = sum over linear layers of  in * out * e_inner  +  out * e_outer
              + attention (QK^T and AV):  2 * n_layer * ctx * d * (e_mul + e_add)_fp16

    fp32 layer      e_inner = fp32 mul + fp32 add        e_outer = 0
    fp16 layer      e_inner = fp16 mul + fp16 add        e_outer = 0
    W1.58A16        e_inner = fp16 add                   e_outer = fp16 mul (scale)
    W1.58A8 / A4    e_inner = int8 add                   e_outer = 2 fp16 mul (weight and token scales)
                    + in * fp16 mul per layer (quantizing the token's activations)

Layers that stay full precision (LM head) and the attention products are fp16 in every variant
except the fp32 baseline. ctx is the mean context of a sequence of seq_len tokens, (seq_len + 1) / 2.
"""

from __future__ import annotations

ENERGY_PJ = {
    "45nm": {"add": {"fp32": 0.9, "fp16": 0.4, "int8": 0.03}, "mul": {"fp32": 3.7, "fp16": 1.1, "int8": 0.2}},
    "7nm": {"add": {"fp32": 0.38, "fp16": 0.16, "int8": 0.007}, "mul": {"fp32": 1.31, "fp16": 0.34, "int8": 0.07}},
}
ARITHMETIC = ("fp32", "fp16", "w158a16", "w158a8", "w158a4")
FORMULA = __doc__.split("\n\n", 2)[2].split("\n\nLayers")[0]


def linear_energy(n_in: int, n_out: int, arithmetic: str, node: str = "45nm") -> float:
    """pJ per token of one linear layer computed in ``arithmetic``."""
    e = ENERGY_PJ[node]
    add, mul = e["add"], e["mul"]
    if arithmetic in ("fp32", "fp16"):
        return n_in * n_out * (mul[arithmetic] + add[arithmetic])
    if arithmetic == "w158a16":
        return n_in * n_out * add["fp16"] + n_out * mul["fp16"]
    if arithmetic in ("w158a8", "w158a4"):
        return n_in * n_out * add["int8"] + 2 * n_out * mul["fp16"] + n_in * mul["fp16"]
    raise ValueError(f"unknown arithmetic {arithmetic!r}")


def energy_per_token(shapes: list[dict], model_shape: dict, arithmetic: str, seq_len: int,
                     node: str = "45nm") -> dict:
    """{'blocks': pJ of the block linears, 'total': pJ of every matmul} per token."""
    full = "fp32" if arithmetic == "fp32" else "fp16"
    blocks = sum(linear_energy(s["in"], s["out"], arithmetic if s["ternary"] else full, node)
                 for s in shapes if s["ternary"] or not s["name"].endswith("lm_head"))
    other = sum(linear_energy(s["in"], s["out"], full, node) for s in shapes
                if not s["ternary"] and s["name"].endswith("lm_head"))
    e = ENERGY_PJ[node]
    ctx = (seq_len + 1) / 2
    attn = 2 * model_shape["n_layer"] * ctx * model_shape["d_model"] * (e["mul"][full] + e["add"][full])
    return {"blocks": blocks, "total": blocks + other + attn}


def weight_bytes(shapes: list[dict], n_params: int) -> dict:
    """Bytes of the weights: all fp32, all bf16, and ternary block linears packed at 2 and 1.6 bits
    (one fp32 scale per tensor) with every other parameter in bf16. Tied heads are counted once."""
    tern = [s["in"] * s["out"] for s in shapes if s["ternary"]]
    n_tern = sum(tern)
    rest = n_params - n_tern
    out = {"fp32": 4 * n_params, "bf16": 2 * n_params}
    if tern:
        out["2bit"] = sum((n + 3) // 4 + 4 for n in tern) + 2 * rest
        out["1.6bit"] = sum((n + 4) // 5 + 4 for n in tern) + 2 * rest
    return out
