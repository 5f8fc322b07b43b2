"""``ternlm quantize``: load a causal LM, quantize its block linears to packed ternary, save it.

    from ternlm.quantization import QuantizeConfig, quantize
    quantize("HuggingFaceTB/SmolLM2-135M", "runs/smol-ternary", QuantizeConfig(fmt="base3"))
    quantize("../shared/data/smollm2-135m", "runs/smol-ptb",
             QuantizeConfig(method="pt-bitnet", calib="../shared/data/wikitext-2/tokens.valid.txt"))

Two methods: ``absmean`` (BitNet b1.58's round-to-nearest, no data) and ``pt-bitnet``
(calibrated, ``ternlm.ptq``: a function-preserving transform, then block-wise error-feedback
rounding with least-squares group scales and output reconstruction; each stage switchable).

Every input is checked before the model is loaded; the output directory is written atomically,
so an interrupted run leaves any earlier output intact.

Big models stream (``ternlm.streaming``): a local safetensors directory is quantized one block at a
time in bounded memory, with the same tensors as the in-memory path, and ``resume=True`` continues a
killed run. ``stream=None`` picks streaming when the model's float32 size would not fit comfortably
in the memory available now; ``plan(source, cfg)`` prints the sizes before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ternlm.checkpoint import EMBED_DTYPES
from ternlm.config import ACT_BITS, FLOAT_DTYPES, FORMATS, GRANULARITIES, SCALE_MODES, QuantConfig, TernaryConfig
from ternlm.errors import TernlmError

METHODS = ("absmean", "pt-bitnet")
from ternlm.ptq.config import PTQ_LOG  # noqa: E402,F401 (re-exported)


@dataclass
class QuantizeConfig:
    """method: ``absmean`` is BitNet b1.58's round-to-nearest with absmean scales (no data).
    fmt: packed storage (2 bits or base-3 1.6 bits per weight). act_bits: 8 / 4 quantize
    activations per token (W1.58A8 / A4), None keeps them float (W1.58A16). float_dtype: storage
    of embeddings, LM head and norms in the file. embed_dtype: ``int8`` stores the token embedding
    (and an untied head) as int8 rows with one float32 scale per row (a tied head reads the same rows);
    ``float`` stores them in float_dtype. include / exclude: fnmatch patterns of module
    names (default: every linear layer of the transformer blocks)."""

    method: str = "absmean"
    fmt: str = "2bit"
    act_bits: int | None = 8
    granularity: str = "per_tensor"
    group_size: int = 128
    scale_mode: str = "absmean"
    float_dtype: str = "fp16"
    embed_dtype: str = "int8"  # token embedding (and head) rows: int8 (one scale per row) or float (float_dtype)
    include: tuple = ()
    exclude: tuple = ()
    # pt-bitnet only (group scales of group_size along the input; granularity is per_group)
    calib: str | None = None         # calibration text: file, directory or hub dataset (never the eval text)
    calib_split: str = "validation"  # hub split / wiki.{split}.raw in a directory
    calib_tokens: int = 8192
    seq_len: int = 512
    transform: bool = True
    error_feedback: bool = True
    reconstruct: bool = True
    reconstruct_steps: int = 32
    seed: int = 0

    def __post_init__(self):
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        for name, value, valid in (("method", self.method, METHODS), ("fmt", self.fmt, FORMATS),
                                   ("act_bits", self.act_bits, ACT_BITS),
                                   ("granularity", self.granularity, GRANULARITIES),
                                   ("scale_mode", self.scale_mode, SCALE_MODES),
                                   ("float_dtype", self.float_dtype, FLOAT_DTYPES),
                                   ("embed_dtype", self.embed_dtype, EMBED_DTYPES)):
            if value not in valid:
                raise TernlmError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, valid))}")
        self.ternary()  # validates group_size and the rest
        if self.method == "pt-bitnet":
            if not self.calib:
                raise TernlmError("--method pt-bitnet needs calibration text (--calib FILE|DIR|hub-id)")
            if self.include or self.exclude:
                raise TernlmError("--include/--exclude are not supported with --method pt-bitnet")
            self.ptbitnet()

    def ptbitnet(self):
        from ternlm.ptq import PTBitNetConfig

        return PTBitNetConfig(calib_tokens=self.calib_tokens, seq_len=self.seq_len, group_size=self.group_size,
                              transform=self.transform, error_feedback=self.error_feedback,
                              reconstruct=self.reconstruct, reconstruct_steps=self.reconstruct_steps, seed=self.seed,
                              act_bits=self.act_bits, fmt=self.fmt)

    def ternary(self) -> TernaryConfig:
        return TernaryConfig(granularity=self.granularity, group_size=self.group_size, scale_mode=self.scale_mode,
                             act_bits=self.act_bits)

    def to_dict(self) -> dict:
        return asdict(self)


def plan(source, cfg: QuantizeConfig | None = None):
    """The size plan of ``source`` (model directory or config.json) from its config and tensor
    headers only: a ``ternlm.streaming.SizePlan`` (``.table()`` prints it)."""
    from ternlm.streaming.plan import make_plan

    return make_plan(source, cfg or QuantizeConfig())


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _should_stream(source, cfg: QuantizeConfig, gguf_file, random_init: bool) -> bool:
    """Auto mode: a local safetensors directory whose float32 model would take over half the free memory,
    or a GPT-OSS one (MXFP4 experts: the in-memory loader would widen them all at once)."""
    p = Path(str(source)).expanduser()
    if gguf_file or random_init or not p.is_dir() or not any(p.glob("*.safetensors")):
        return False
    pl = plan(p, cfg)
    return pl.params * 4 > _available_memory() / 2 or (pl.rows["experts"].params > 0 and pl.model_type == "gpt_oss")


def quantize(source, out_dir: str | Path, cfg: QuantizeConfig | None = None, *, gguf_file: str | None = None,
             random_init: bool = False, progress: bool = True, stream: bool | None = None,
             resume: bool = False) -> Path:
    """Quantize ``source`` into ``out_dir`` (see ``_quantize``) and write its model card (README.md)."""
    from ternlm.modelcard import source_info, write_model_card

    cfg = cfg or QuantizeConfig()
    out = _quantize(source, out_dir, cfg, gguf_file=gguf_file, random_init=random_init, progress=progress,
                    stream=stream, resume=resume)
    info = source_info(source, gguf_file) if not random_init else {}
    write_model_card(out, method=cfg.method, settings=cfg.to_dict(), **info)
    return out


def _quantize(source, out_dir: str | Path, cfg: QuantizeConfig | None = None, *, gguf_file: str | None = None,
              random_init: bool = False, progress: bool = True, stream: bool | None = None,
              resume: bool = False) -> Path:
    """Load ``source`` (directory, GGUF or hub id), convert it to packed ternary, save it to ``out_dir``.

    The tokenizer is saved beside the weights when the source has one. Returns the output path.
    stream: True quantizes a local safetensors directory block by block in bounded memory,
    False loads the whole model, None (default) streams when the model is big or has experts.
    resume: continue a streaming run that was killed (implies stream).
    """
    from ternlm.checkpoint import save_pretrained
    from ternlm.conversion import convert
    from ternlm.fileio import check_output_dir
    from ternlm.models.loading import load, source_kind

    cfg = cfg or QuantizeConfig()
    check_output_dir(out_dir)
    if resume and stream is False:
        raise TernlmError("--resume continues a streaming run; it cannot be combined with stream=False")
    if stream is None:
        stream = resume or _should_stream(source, cfg, gguf_file, random_init)
    if stream:
        if random_init:
            raise TernlmError("streaming reads a local model directory or GGUF file (no --random-init)")
        from ternlm.streaming.quantize import stream_quantize


        return stream_quantize(source, out_dir, cfg, resume=resume, progress=progress, gguf_file=gguf_file)
    if cfg.method == "pt-bitnet":
        from ternlm.data.text import check_source

        check_source(cfg.calib, "calibration text")
    if source_kind(source, gguf_file) in ("ternlm", "ternlm-gguf"):
        raise TernlmError(f"{source} is already a packed ternary model")
    if cfg.method == "absmean":
        model, tokenizer = load(source, gguf_file=gguf_file, random_init=random_init)
        qc = QuantConfig(weights=cfg.ternary(), include=cfg.include, exclude=cfg.exclude)
        convert(model, qc, fmt=cfg.fmt, act_bits=cfg.act_bits)
        from ternlm.moe.experts import convert_experts

        convert_experts(model, cfg.ternary(), cfg.fmt)  # GPT-OSS 3-D experts; a no-op for dense models
        return save_pretrained(model, tokenizer, out_dir, float_dtype=cfg.float_dtype, embed_dtype=cfg.embed_dtype)

    import json

    from ternlm.data.text import load_text
    from ternlm.ptq import calibration_ids, ptbitnet_quantize

    pcfg = cfg.ptbitnet()
    text = load_text(cfg.calib, split=cfg.calib_split)
    model, tokenizer = load(source, gguf_file=gguf_file, random_init=random_init)
    if tokenizer is None:
        raise TernlmError(f"no tokenizer files in {source}: pt-bitnet needs one to read the calibration text")
    ids = calibration_ids(tokenizer, text, pcfg.calib_tokens, pcfg.seq_len, pcfg.seed)
    log = ptbitnet_quantize(model, ids, pcfg, progress=progress)
    log.update(source=str(source), calib=str(cfg.calib), quantize_config=cfg.to_dict())
    return save_pretrained(model, tokenizer, out_dir, float_dtype=cfg.float_dtype, embed_dtype=cfg.embed_dtype,
                           extra_files={PTQ_LOG: json.dumps(log, indent=2, default=str) + "\n"})
