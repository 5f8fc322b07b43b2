"""Quantization configs: one dataclass per method, validated on construction.

Every config round-trips through ``to_dict`` / ``config_from_dict`` so it can be saved into
checkpoints and reports (never encoded in file names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Union

from ternlm.errors import TernlmError

# The valid sets, each defined once here and imported everywhere else.
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
# Activation precision of ternary layers: None = float (W1.58A16), 8 / 4 = per-token int (W1.58A8 / A4).
ACT_BITS = (None, 8, 4)
# Largest integer of each per-token activation width (absmax scale = max|x| / QMAX[bits]).
QMAX = {8: 127.0, 4: 7.0}
# Packed storage of ternary codes (see ternlm.quant.pack).
FORMATS = ("2bit", "base3")
KERNELS = ("auto", "reference")  # packed-layer kernel choice: compiled/Triton by dispatch, or the reference twin
# Storage of an LM head / float tensors in a decode engine or checkpoint.
HEADS = ("fp32", "fp16", "bf16", "int8", "auto")  # auto: the dtype the head's rows are stored in
FLOAT_DTYPES = ("fp32", "fp16", "bf16")
SCALE_MODES = ("absmean", "fit")


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """The one validation of sampling settings (generation CLI, HF wrapper, decode engine)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise TernlmError("temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise TernlmError(msg)


@dataclass
class TernaryConfig:
    """BitNet b1.58 absmean ternary weights, optionally with quantized activations.

    granularity: one scale per tensor (BitNet's choice), per output channel, or per group of
        ``group_size`` consecutive weights along the input dimension.
    scale_mode: ``absmean`` uses the BitNet scale gamma = mean|W| for both rounding and
        dequantization; ``fit`` rounds with gamma but dequantizes with the least-squares scale for
        the chosen codes (mean |W| over non-zero codes), which makes re-quantizing a ternary tensor
        exactly idempotent and lowers reconstruction error.
    act_bits: None keeps activations in float (W1.58A16); 8 or 4 quantizes them per token
        (W1.58A8 / W1.58A4).
    lambda_warmup_steps: during QAT, blend latent and quantized weights, lambda rising linearly
        from 0 to 1 over this many optimizer steps (0 = quantized from the first step).
    project_after_step: during QAT, overwrite the latent weights with their ternary projection
        after every optimizer step (the alternative recipe to keeping free latent weights).
    """

    method: ClassVar[str] = "ternary"
    granularity: str = "per_tensor"
    group_size: int = 128
    scale_mode: str = "absmean"
    act_bits: Union[int, None] = None
    eps: float = 1e-5
    lambda_warmup_steps: int = 0
    project_after_step: bool = False

    def __post_init__(self):
        _check(self.granularity in GRANULARITIES,
               f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        _check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        _check(self.scale_mode in SCALE_MODES,
               f"unknown scale_mode {self.scale_mode!r}; choose one of {', '.join(SCALE_MODES)}")
        _check(self.act_bits in ACT_BITS, f"act_bits must be None, 8 or 4, got {self.act_bits!r}")
        _check(self.eps > 0, "eps must be positive")
        _check(self.lambda_warmup_steps >= 0, "lambda_warmup_steps must be >= 0")


@dataclass
class Int8Config:
    """Classic 8-bit weight quantization: symmetric absmax or asymmetric zero-point."""

    method: ClassVar[str] = "int8"
    scheme: str = "absmax"
    granularity: str = "per_channel"

    def __post_init__(self):
        _check(self.scheme in ("absmax", "zeropoint"),
               f"unknown int8 scheme {self.scheme!r}; choose absmax or zeropoint")
        _check(self.granularity in ("per_tensor", "per_channel"),
               f"int8 granularity must be per_tensor or per_channel, got {self.granularity!r}")


@dataclass
class LLMInt8Config:
    """LLM.int8(): vector-wise int8 with fp16 outlier feature columns (Dettmers et al., 2022).

    backend: ``auto`` uses bitsandbytes when it imports and supports this device, else the
    PyTorch implementation in ``ternlm.quant.llm_int8``; the report records which one ran.
    """

    method: ClassVar[str] = "llm_int8"
    threshold: float = 6.0
    backend: str = "auto"

    def __post_init__(self):
        _check(self.threshold > 0, f"threshold must be positive, got {self.threshold}")
        _check(self.backend in ("auto", "bitsandbytes", "torch"),
               f"unknown LLM.int8 backend {self.backend!r}; choose auto, bitsandbytes or torch")


WeightConfig = Union[TernaryConfig, Int8Config, LLMInt8Config]


@dataclass
class QuantConfig:
    """Which modules to quantize and how.

    include / exclude are fnmatch patterns over module names (``transformer.h.*.attn.*``).
    With no include patterns the default target is every linear layer (``nn.Linear`` or GPT-2's
    ``Conv1D``) inside the model's repeated transformer blocks; embeddings, norms, the LM head and
    classification heads stay in their original precision.
    """

    weights: WeightConfig = field(default_factory=TernaryConfig)
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self):
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        _check(isinstance(self.weights, (TernaryConfig, Int8Config, LLMInt8Config)),
               f"weights must be a TernaryConfig, Int8Config or LLMInt8Config, got {type(self.weights).__name__}")

    def to_dict(self) -> dict:
        return {"weights": config_to_dict(self.weights), "include": list(self.include),
                "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(weights=config_from_dict(d["weights"]), include=tuple(d.get("include", ())),
                   exclude=tuple(d.get("exclude", ())))


_BY_METHOD = {c.method: c for c in (TernaryConfig, Int8Config, LLMInt8Config)}

# Names used on the command line and as report variant keys.
METHODS = {
    "ternary": lambda: TernaryConfig(),
    "int8_absmax": lambda: Int8Config(scheme="absmax"),
    "int8_zeropoint": lambda: Int8Config(scheme="zeropoint"),
    "llm_int8": lambda: LLMInt8Config(),
}


def config_to_dict(cfg: WeightConfig) -> dict:
    return {"method": cfg.method, **asdict(cfg)}


def config_from_dict(d: dict) -> WeightConfig:
    d = dict(d)
    method = d.pop("method", None)
    if method not in _BY_METHOD:
        raise TernlmError(f"unknown quantization method {method!r} in config")
    cls = _BY_METHOD[method]
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise TernlmError(f"unknown {method} config keys: {', '.join(sorted(unknown))}")
    return cls(**d)


def method_config(name: str, **overrides) -> WeightConfig:
    """Build the weight config for a command-line method name (``ternary``, ``int8_absmax``...)."""
    if name not in METHODS:
        raise TernlmError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cfg = METHODS[name]()
    if overrides:
        d = config_to_dict(cfg)
        d.update({k: v for k, v in overrides.items() if v is not None})
        cfg = config_from_dict(d)
    return cfg
