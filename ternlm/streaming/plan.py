"""The size plan: what a model weighs now and after ternary packing, from its config and headers only.

    ternlm plan MODEL_DIR            (or ternlm quantize MODEL_DIR OUT --plan)
    ternlm plan path/to/config.json  (no weights needed: bytes now from the config's dtype)

Per component -- embeddings, attention, dense MLP, experts, router, norms/biases/sinks, LM head --
the parameter count (from the architecture built on the meta device: nothing is allocated), the
bytes on disk now (from the safetensors headers, MXFP4 blocks included, or estimated from the
config), and the bytes after quantization in both packed formats with their float32 scales.
Ternary components: block linears and expert slices (2 bits or 1.6 bits a weight, plus scales);
embeddings, head, norms and router at ``float_dtype``; biases of ternary layers in float32.

The peak RAM line estimates the streaming run (``ternlm.streaming.quantize``): the interpreter
with torch and transformers loaded (``BASE_RSS``), the largest tensor read whole (float tensors
outside the blocks are cast in row chunks), three float32 copies of the largest matrix being quantized (the weight, |W|/gamma, the rounded codes), and the
largest block of packed output waiting to be written. For ``pt-bitnet`` (``ternlm.streaming.ptbitnet``):
one block in float32 with its float64 input Hessians, or the float32 layers in front of the blocks,
plus three float32 activation streams of the calibration tokens. That pt-bitnet figure is a lower
bound: on a 360 MB synthetic Llama (``scripts/stream_bench.py --method pt-bitnet``) it said 0.73 GB
where 1.27 GB was measured (the calibration text and tokenizer, the reconstruction's autograd and
the allocator's slack are not modelled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ternlm.errors import TernlmError

BASE_RSS = 580e6  # python + torch + transformers + ternlm imported, measured (scripts/stream_bench.py)
COMPONENTS = ("embeddings", "attention", "mlp", "experts", "router", "norms/biases/sinks", "lm_head")
_FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}
MXFP4_BYTES_PER_WEIGHT = 17 / 32  # 16 bytes of 4-bit values + one E8M0 scale byte per 32 weights


@dataclass
class Row:
    params: int = 0
    now: int = 0
    after: dict = field(default_factory=lambda: {"2bit": 0, "base3": 0})
    ternary: bool = False


@dataclass
class SizePlan:
    """Per-component sizes; ``table()`` prints them, ``bytes_after(fmt)`` is the output's size."""

    model_type: str
    rows: dict
    peak_ram: int
    now_from: str  # "headers" or "config dtype"

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows.values())

    def bytes_now(self) -> int:
        return sum(r.now for r in self.rows.values())

    def bytes_after(self, fmt: str = "2bit") -> int:
        return sum(r.after[fmt] for r in self.rows.values())

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "params": self.params, "bytes_now": self.bytes_now(),
                "bytes_after": {f: self.bytes_after(f) for f in ("2bit", "base3")}, "peak_ram": self.peak_ram,
                "now_from": self.now_from,
                "rows": {k: {"params": r.params, "now": r.now, "after": r.after, "ternary": r.ternary}
                         for k, r in self.rows.items()}}

    def table(self) -> str:
        def gb(b):
            return f"{b / 1e9:9.3f}"

        lines = [f"size plan for {self.model_type} (bytes now from {self.now_from}; GB = 1e9 bytes)",
                 f"{'component':<20} {'params':>14} {'now GB':>9} {'2-bit GB':>9} {'1.6-bit GB':>10}  stored as"]
        for k, r in self.rows.items():
            if not r.params:
                continue
            kind = "ternary + fp32 scales" if r.ternary else "float"
            lines.append(f"{k:<20} {r.params:>14,} {gb(r.now)} {gb(r.after['2bit'])} {gb(r.after['base3']):>10}  "
                         f"{kind}")
        lines.append(f"{'total':<20} {self.params:>14,} {gb(self.bytes_now())} {gb(self.bytes_after('2bit'))} "
                     f"{gb(self.bytes_after('base3')):>10}")
        lines.append(f"expected peak RAM of the streaming run: {self.peak_ram / 1e9:.2f} GB")
        return "\n".join(lines)


def meta_model(config):
    """The causal LM of ``config`` on the meta device (float32, nothing allocated)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise TernlmError(f"cannot build a causal LM for model type {getattr(config, 'model_type', '?')!r}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _load_config(source):
    from transformers import AutoConfig

    if isinstance(source, dict):
        d = dict(source)
        mt = d.pop("model_type", None)
        if "torch_dtype" in d:  # the older key in published configs
            d.setdefault("dtype", d.pop("torch_dtype"))
        try:
            return AutoConfig.for_model(mt, **d)
        except Exception as e:
            raise TernlmError(f"cannot build a config for model type {mt!r}: {type(e).__name__}") from None
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".json":
        try:
            return _load_config(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise TernlmError(f"cannot read {p}: {type(e).__name__}") from None
    if not p.is_dir():
        raise TernlmError(f"the plan reads a model directory or a config.json; {source} is neither")
    try:
        return AutoConfig.from_pretrained(str(p))
    except Exception as e:
        raise TernlmError(f"cannot read the model config in {p}: {type(e).__name__}") from None


def _component(name: str, module_type: str, targets: set, experts: set, embeds: set, head: str) -> str:
    module = name.rpartition(".")[0]
    if module in experts:
        return "experts" if name.endswith("_proj") else "norms/biases/sinks"
    if module in targets:
        if not name.endswith(".weight"):
            return "norms/biases/sinks"
        return "attention" if ("attn" in module or "attention" in module) else "mlp"
    if module in embeds:
        return "embeddings"
    if module == head:
        return "lm_head"
    if "router" in module or module.endswith(".gate"):
        return "router"
    return "norms/biases/sinks"


def make_plan(source, cfg=None) -> SizePlan:
    """The size plan of ``source`` (model directory, config.json path or config dict).

    cfg: a ``QuantizeConfig`` (or anything with fmt/granularity/group_size/float_dtype/include/exclude,
    optionally embed_dtype); None: the defaults (per-tensor scales, fp16 float tensors, int8 embedding
    rows, the block linears as targets).
    """
    from types import SimpleNamespace

    cfg = cfg or SimpleNamespace(granularity="per_tensor", group_size=128, float_dtype="fp16", include=(),
                                 exclude=(), act_bits=8, scale_mode="absmean", embed_dtype="int8")
    config = _load_config(source)
    src_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(src_dtype, str):
        src_dtype = getattr(torch, src_dtype, None)
    model = meta_model(config)  # NOTE: sets config.dtype to float32, so the source dtype is read first
    from ternlm.config import QuantConfig, TernaryConfig
    from ternlm.moe.experts import expert_modules
    from ternlm.nn.bitlinear import linear_weight_out_in
    from ternlm.nn.surgery import select_targets
    from ternlm.quant.pack import ternary_layer_bytes

    tcfg = TernaryConfig(granularity=cfg.granularity, group_size=cfg.group_size)
    targets = set(select_targets(model, QuantConfig(weights=tcfg, include=cfg.include, exclude=cfg.exclude)))
    experts = set(expert_modules(model))
    embeds = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    out_emb = model.get_output_embeddings()
    head = next((n for n, m in model.named_modules() if m is out_emb), "") if out_emb is not None else ""

    headers = None
    p = Path(source).expanduser() if not isinstance(source, dict) else None
    if p is not None and p.is_dir():
        from ternlm.streaming.files import SourceFiles

        try:
            headers = SourceFiles(p)
        except TernlmError as e:
            if "no safetensors weights" not in str(e):
                raise
    prefix = getattr(model, "base_model_prefix", "")
    now_bytes = _DTYPE_BYTES.get(src_dtype, 4)
    mxfp4 = (getattr(config, "quantization_config", None) or {})
    mxfp4 = (mxfp4.get("quant_method") if isinstance(mxfp4, dict) else getattr(mxfp4, "quant_method", None)) == "mxfp4"

    fb = _FLOAT_BYTES[cfg.float_dtype]
    int8_rows = getattr(cfg, "embed_dtype", "float") == "int8"
    in_emb = model.get_input_embeddings()
    emb_name = next((n for n, m in model.named_modules() if m is in_emb), "") if in_emb is not None else ""
    rows = {c: Row(ternary=c in ("attention", "mlp", "experts")) for c in COMPONENTS}
    seen = set()
    largest_read = largest_matrix = float_peak = 0
    unit_out: dict[str, int] = {}
    unit_fp32: dict[str, int] = {}  # a block's parameters in float32 (pt-bitnet holds one block whole)
    unit_hess: dict[str, int] = {}  # its linears' float64 input Hessians
    front = 0                       # float32 layers in front of the blocks (pt-bitnet's calibration pass)
    for name, prm in model.named_parameters(remove_duplicate=True):
        if id(prm) in seen:
            continue
        seen.add(id(prm))
        comp = _component(name, type(model).__name__, targets, experts, embeds, head)
        r = rows[comp]
        n = prm.numel()
        r.params += n
        module = name.rpartition(".")[0]
        # bytes now
        if headers is not None:
            cands = [name, name[len(prefix) + 1:] if name.startswith(prefix + ".") else None]
            now = 0
            for c in filter(None, cands):
                if c in headers.entries:
                    now = headers.entries[c].nbytes
                    break
                if c + "_blocks" in headers.entries:
                    now = headers.entries[c + "_blocks"].nbytes + headers.entries.get(c + "_scales").nbytes
                    break
            if r.ternary:
                largest_read = max(largest_read, now)
        else:
            now = int(n * (MXFP4_BYTES_PER_WEIGHT if (mxfp4 and comp == "experts") else now_bytes))
        r.now += now
        # bytes after
        if comp in ("attention", "mlp"):
            out_f, in_f = linear_weight_out_in(model.get_submodule(module)).shape
            for fmt in r.after:
                r.after[fmt] += ternary_layer_bytes(out_f, in_f, fmt, cfg.granularity, cfg.group_size)
            largest_matrix = max(largest_matrix, n)
        elif comp == "experts":
            e, a, b = prm.shape  # (experts, in, out): each slice an (out, in) ternary matrix
            for fmt in r.after:
                r.after[fmt] += e * ternary_layer_bytes(b, a, fmt, cfg.granularity, cfg.group_size)
            largest_matrix = max(largest_matrix, a * b)
        elif comp in ("embeddings", "lm_head") and int8_rows and prm.dim() == 2 and module in (emb_name, head):
            for fmt in r.after:  # int8 rows + one float32 scale per row
                r.after[fmt] += n + 4 * prm.shape[0]
            float_peak = max(float_peak, n + min(n * 4, 32 << 20))
        else:
            keep = 4 if module in targets or module in experts else fb
            for fmt in r.after:
                r.after[fmt] += n * keep
            float_peak = max(float_peak, n * keep + min(n * 4, 32 << 20))  # cast in 32 MB row chunks
        unit = name.split(".")
        key = next((".".join(unit[:i + 1]) for i, s in enumerate(unit) if s.isdigit()), None)
        if key is not None:
            unit_out[key] = unit_out.get(key, 0) + (n // 4 if r.ternary else n * fb)
            unit_fp32[key] = unit_fp32.get(key, 0) + 4 * n
            if comp in ("attention", "mlp") and name.endswith(".weight"):
                in_f = linear_weight_out_in(model.get_submodule(module)).shape[1]
                unit_hess[key] = unit_hess.get(key, 0) + 8 * in_f * in_f
        elif comp != "lm_head":
            front += 4 * n
    if headers is None:
        largest_read = max(largest_read, int(largest_matrix * (MXFP4_BYTES_PER_WEIGHT * 32 if mxfp4 else now_bytes)))
    # a block: its largest source tensor, three float32 copies of one matrix, its packed output;
    # a tensor outside the blocks: its cast copy plus one chunk
    block_peak = largest_read + 3 * 4 * largest_matrix + max(unit_out.values(), default=0)
    peak = int(BASE_RSS + max(block_peak, float_peak))
    if getattr(cfg, "method", "absmean") == "pt-bitnet":
        # one float32 block + its Hessians + three activation streams (x_q, x_fp, y_fp) of the
        # calibration tokens; before the blocks: the float32 front layers + the streams
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
        tokens = cfg.calib_tokens // cfg.seq_len * cfg.seq_len
        streams = 3 * 4 * tokens * hidden
        block = max((unit_fp32[k] + unit_hess.get(k, 0) + unit_out[k] for k in unit_fp32), default=0)
        peak = int(BASE_RSS + streams + max(block, front, float_peak))
    return SizePlan(getattr(config, "model_type", "?"), rows, peak, "headers" if headers else "config dtype")
