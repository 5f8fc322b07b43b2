"""The architectures ternlm runs end to end, one row each: decode engine (from a model or straight
from checkpoint files), pt-bitnet's block layout and scale migrations, streaming, GGUF export.

    from ternlm.arch import Arch, row_for
    a = Arch.from_config(model.config)        # dimensions, norms, positions, MLP kind (any row)
    row = row_for("llama")                    # module paths, tensor names, GGUF names of a block

A row lists a block's slots: two norms, the attention input projections (separate q/k/v, or GPT-2's
fused ``c_attn``), the attention output, the MLP input projections (gate + up, or ``c_fc``) and the
MLP output, each with its module path inside a block, the tensor name in a checkpoint (the stack
prefix + block index + path) and llama.cpp's GGUF name; plus the model-level tensors (embedding,
learned positions, final norm, head) and what pt-bitnet may migrate between them (``migrations``).
Adding an architecture is one ``ROWS`` entry whose config reader fills ``Arch``, and its tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from ternlm.errors import TernlmError


@dataclass(frozen=True)
class Slot:
    """One linear layer of a block: ``path`` inside the block, llama.cpp's ``gguf`` name (in block i:
    ``blk.{i}.{gguf}``), ``conv1d`` when the weight is stored (in, out) (GPT-2), ``rope`` "q" / "k"
    when llama.cpp orders its rows for interleaved RoPE (Llama's q_proj / k_proj)."""

    path: str
    gguf: str
    conv1d: bool = False
    rope: str | None = None


@dataclass(frozen=True)
class Arch:
    """What the block step needs to know about a model, read once from its config (``from_config``)."""

    model_type: str
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int       # < n_head: grouped-query attention
    head_dim: int
    inner: int           # MLP width
    vocab_size: int
    max_positions: int
    norm: str            # "layernorm" | "rmsnorm"
    norm_eps: float
    positions: str       # "learned" | "rope"
    mlp: str             # "gelu" | "gated_silu"
    tied_head: bool
    rope_theta: float = 10000.0
    attn_bias: bool = False  # q/k/v projections with biases (Qwen2)
    rope_type: str = "default"  # the engine built from a model uses its rotary module (any type); files: default

    @classmethod
    def from_config(cls, config, *, tied: bool | None = None) -> "Arch":
        """The ``Arch`` of a Hugging Face config (object or config.json dict); ``tied`` overrides the
        config's tie_word_embeddings (what the weights actually do). A one-line TernlmError for a model
        type no row covers, or a configuration the row does not run."""
        cfg = config if isinstance(config, dict) else config.to_dict()
        row = row_for(cfg.get("model_type"))
        try:
            a = row.read(cfg)
        except KeyError as e:
            raise TernlmError(f"the {row.model_type} config has no {e.args[0]!r}") from None
        if tied is not None and tied != a.tied_head:
            from dataclasses import replace

            a = replace(a, tied_head=tied)
        return a

    @property
    def row(self) -> "Row":
        return row_for(self.model_type)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Row:
    """One architecture: where everything is, and how its config reads (``read``: dict -> Arch)."""

    model_type: str
    gguf_arch: str          # gguf-py's MODEL_ARCH name
    stack: str              # module path of the block list
    embed: str              # token embedding module
    pos_embed: str | None   # learned positions module (GPT-2)
    final_norm: str
    head: str
    norm1: str
    norm2: str
    qkv: tuple              # Slots feeding attention, in the order their outputs are concatenated
    o: Slot
    up: tuple               # Slots feeding the MLP (gate first for gated_silu)
    down: Slot
    read: Callable[[dict], Arch]
    fused_qkv: bool = False  # one projection holds q, k and v (GPT-2's c_attn)

    @property
    def linears(self) -> tuple:
        return (*self.qkv, self.o, *self.up, self.down)

    def block(self, i: int) -> str:
        return f"{self.stack}.{i}"

    def migrations(self) -> tuple:
        """pt-bitnet's function-preserving scale migrations, as (kind, source, targets):
        ("norm", norm path, linear paths fed by it); ("v_to_o", v source path, o path): v's rows to o's
        columns through attention; ("up_to_down", up path, down path): through the gated product."""
        out = [("norm", self.norm1, tuple(s.path for s in self.qkv)), ("v_to_o", self.qkv[-1].path, self.o.path),
               ("norm", self.norm2, tuple(s.path for s in self.up))]
        if len(self.up) == 2:  # gated: up's rows scale down's columns linearly (silu(gate) * up)
            out.append(("up_to_down", self.up[1].path, self.down.path))
        return tuple(out)


# ---------------------------------------------------------------------------------------------
# Config readers


def _rope(cfg: dict) -> tuple[float, str]:
    """(theta, rope type) (``rope_parameters`` in current configs, ``rope_theta``/``rope_scaling`` in
    older ones)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        return float(rp.get("rope_theta", 10000.0)), str(rp.get("rope_type", "default"))
    rs = cfg.get("rope_scaling") or {}
    return float(cfg.get("rope_theta", 10000.0)), str(rs.get("rope_type") or rs.get("type") or "default")


GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def _read_gpt2(cfg: dict) -> Arch:
    for k in ("add_cross_attention", "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx"):
        if cfg.get(k):
            raise TernlmError(f"ternlm does not run GPT-2 configs with {k}")
    if not cfg.get("scale_attn_weights", True):
        raise TernlmError("ternlm does not run GPT-2 configs without scale_attn_weights")
    if cfg.get("activation_function", "gelu_new") not in GPT2_ACTS:
        raise TernlmError(f"ternlm does not run GPT-2 activation {cfg['activation_function']!r}")
    C, nh = cfg["n_embd"], cfg["n_head"]
    return Arch("gpt2", cfg["n_layer"], C, nh, nh, C // nh, cfg.get("n_inner") or 4 * C, cfg["vocab_size"],
                cfg["n_positions"], "layernorm", cfg.get("layer_norm_epsilon", 1e-5), "learned", "gelu",
                cfg.get("tie_word_embeddings", True))


def _read_llama_like(model_type: str, attn_bias: bool, tied_default: bool) -> Callable[[dict], Arch]:
    def read(cfg: dict) -> Arch:
        if cfg.get("hidden_act", "silu") != "silu":
            raise TernlmError(f"ternlm runs gated SiLU {model_type} MLPs, not {cfg['hidden_act']!r}")
        if cfg.get("mlp_bias") or cfg.get("attention_bias", attn_bias) != attn_bias:
            raise TernlmError(f"ternlm does not run {model_type} configs with mlp_bias / attention_bias")
        if cfg.get("use_sliding_window"):
            raise TernlmError(f"ternlm does not run {model_type} with sliding-window attention")
        C, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        theta, rope_type = _rope(cfg)
        return Arch(model_type, cfg["num_hidden_layers"], C, nh, cfg.get("num_key_value_heads") or nh,
                    cfg.get("head_dim") or C // nh, cfg["intermediate_size"], cfg["vocab_size"],
                    cfg["max_position_embeddings"], "rmsnorm", cfg.get("rms_norm_eps", 1e-6), "rope", "gated_silu",
                    cfg.get("tie_word_embeddings", tied_default), theta, attn_bias, rope_type)
    return read


# ---------------------------------------------------------------------------------------------
# The table

_LLAMA_BLOCK = dict(
    norm1="input_layernorm", norm2="post_attention_layernorm",
    o=Slot("self_attn.o_proj", "attn_output"),
    up=(Slot("mlp.gate_proj", "ffn_gate"), Slot("mlp.up_proj", "ffn_up")),
    down=Slot("mlp.down_proj", "ffn_down"),
    stack="model.layers", embed="model.embed_tokens", pos_embed=None, final_norm="model.norm", head="lm_head")

ROWS: dict[str, Row] = {r.model_type: r for r in (
    Row("gpt2", "gpt2", stack="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
        final_norm="transformer.ln_f", head="lm_head", norm1="ln_1", norm2="ln_2",
        qkv=(Slot("attn.c_attn", "attn_qkv", conv1d=True),), o=Slot("attn.c_proj", "attn_output", conv1d=True),
        up=(Slot("mlp.c_fc", "ffn_up", conv1d=True),), down=Slot("mlp.c_proj", "ffn_down", conv1d=True),
        read=_read_gpt2, fused_qkv=True),
    Row("llama", "llama", qkv=(Slot("self_attn.q_proj", "attn_q", rope="q"), Slot("self_attn.k_proj", "attn_k", rope="k"),
                               Slot("self_attn.v_proj", "attn_v")),
        read=_read_llama_like("llama", False, False), **_LLAMA_BLOCK),
    # Qwen2: the Llama block with biases on q, k and v; llama.cpp runs it with NeoX RoPE (rows as HF has them)
    Row("qwen2", "qwen2", qkv=(Slot("self_attn.q_proj", "attn_q"), Slot("self_attn.k_proj", "attn_k"),
                               Slot("self_attn.v_proj", "attn_v")),
        read=_read_llama_like("qwen2", True, False), **_LLAMA_BLOCK),
)}

ARCHS = tuple(ROWS)  # the Hugging Face model_type values ternlm runs end to end


def row_for(model_type) -> Row:
    if model_type not in ROWS:
        raise TernlmError(f"ternlm's engine runs {', '.join(ROWS)} models, not {model_type!r}")
    return ROWS[model_type]
