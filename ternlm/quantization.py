"""``ternlm quantize``: load a causal LM, quantize its block linears to packed ternary, save it.

    from ternlm.quantization import QuantizeConfig, quantize
    quantize("HuggingFaceTB/SmolLM2-135M", "runs/smol-ternary", QuantizeConfig(fmt="base3"))

Every input is checked before the model is loaded; the output directory is written atomically,
so an interrupted run leaves any earlier output intact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ternlm.config import ACT_BITS, FLOAT_DTYPES, FORMATS, GRANULARITIES, SCALE_MODES, QuantConfig, TernaryConfig
from ternlm.errors import TernlmError

METHODS = ("absmean",)


@dataclass
class QuantizeConfig:
    """method: ``absmean`` is BitNet b1.58's round-to-nearest with absmean scales (no data).
    fmt: packed storage (2 bits or base-3 1.6 bits per weight). act_bits: 8 / 4 quantize
    activations per token (W1.58A8 / A4), None keeps them float (W1.58A16). float_dtype: storage
    of embeddings, LM head and norms in the file. include / exclude: fnmatch patterns of module
    names (default: every linear layer of the transformer blocks)."""

    method: str = "absmean"
    fmt: str = "2bit"
    act_bits: int | None = 8
    granularity: str = "per_tensor"
    group_size: int = 128
    scale_mode: str = "absmean"
    float_dtype: str = "fp16"
    include: tuple = ()
    exclude: tuple = ()

    def __post_init__(self):
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        for name, value, valid in (("method", self.method, METHODS), ("fmt", self.fmt, FORMATS),
                                   ("act_bits", self.act_bits, ACT_BITS),
                                   ("granularity", self.granularity, GRANULARITIES),
                                   ("scale_mode", self.scale_mode, SCALE_MODES),
                                   ("float_dtype", self.float_dtype, FLOAT_DTYPES)):
            if value not in valid:
                raise TernlmError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, valid))}")
        self.ternary()  # validates group_size and the rest

    def ternary(self) -> TernaryConfig:
        return TernaryConfig(granularity=self.granularity, group_size=self.group_size, scale_mode=self.scale_mode,
                             act_bits=self.act_bits)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize(source, out_dir: str | Path, cfg: QuantizeConfig | None = None, *, gguf_file: str | None = None,
             random_init: bool = False) -> Path:
    """Load ``source`` (directory, GGUF or hub id), convert it to packed ternary, save it to ``out_dir``.

    The tokenizer is saved beside the weights when the source has one. Returns the output path.
    """
    from ternlm.checkpoint import save_pretrained
    from ternlm.conversion import convert
    from ternlm.fileio import check_output_dir
    from ternlm.models.loading import load, source_kind

    cfg = cfg or QuantizeConfig()
    check_output_dir(out_dir)
    if source_kind(source, gguf_file) in ("ternlm", "ternlm-gguf"):
        raise TernlmError(f"{source} is already a packed ternary model")
    model, tokenizer = load(source, gguf_file=gguf_file, random_init=random_init)
    qc = QuantConfig(weights=cfg.ternary(), include=cfg.include, exclude=cfg.exclude)
    convert(model, qc, fmt=cfg.fmt, act_bits=cfg.act_bits)
    return save_pretrained(model, tokenizer, out_dir, float_dtype=cfg.float_dtype)
