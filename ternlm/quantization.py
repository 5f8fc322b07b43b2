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
BUDGET_LOG = "ternlm_budget.json"  # the bits budget's plan: sensitivities, the int8 layers, bits reached
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
    act_bits: int | None | str = "auto"  # auto: the training run's variant when the model has one, else 8
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
    # bits budget (ternlm.ptq.budget): keep the most sensitive block linears at int8 rows until the block
    # linears take budget_bpw bits per weight, scales included; sensitivity measured on budget_tokens of --calib
    budget_bpw: float | None = None
    budget_tokens: int = 512

    def __post_init__(self):
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        for name, value, valid in (("method", self.method, METHODS), ("fmt", self.fmt, FORMATS),
                                   ("act_bits", self.act_bits, (*ACT_BITS, "auto")),
                                   ("granularity", self.granularity, GRANULARITIES),
                                   ("scale_mode", self.scale_mode, SCALE_MODES),
                                   ("float_dtype", self.float_dtype, FLOAT_DTYPES),
                                   ("embed_dtype", self.embed_dtype, EMBED_DTYPES)):
            if value not in valid:
                raise TernlmError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, valid))}")
        self.ternary()  # validates group_size and the rest
        if self.budget_bpw is not None:
            if not self.budget_bpw > 0:
                raise TernlmError(f"--budget-bpw must be > 0, got {self.budget_bpw}")
            if not self.calib:
                raise TernlmError("--budget-bpw measures each layer's sensitivity on calibration text: pass --calib")
            if self.budget_tokens < 2:
                raise TernlmError("budget_tokens must be >= 2")
        if self.method == "pt-bitnet":
            if not self.calib:
                raise TernlmError("--method pt-bitnet needs calibration text (--calib FILE|DIR|hub-id)")
            if self.include or self.exclude:
                raise TernlmError("--include/--exclude are not supported with --method pt-bitnet")
            self.ptbitnet()

    @property
    def acts(self) -> int | None:
        """act_bits with ``auto`` read as 8 (``resolve`` replaces it by the source's own first)."""
        return 8 if self.act_bits == "auto" else self.act_bits

    def resolve(self, source) -> "QuantizeConfig":
        """This config with ``act_bits="auto"`` replaced: the activation bits a ``ternlm train`` model was
        trained with (its ``ternlm_training.json``), else 8."""
        from dataclasses import replace

        if self.act_bits != "auto":
            return self
        return replace(self, act_bits=trained_act_bits(source, default=8))

    def ptbitnet(self):
        from ternlm.ptq import PTBitNetConfig

        return PTBitNetConfig(calib_tokens=self.calib_tokens, seq_len=self.seq_len, group_size=self.group_size,
                              transform=self.transform, error_feedback=self.error_feedback,
                              reconstruct=self.reconstruct, reconstruct_steps=self.reconstruct_steps, seed=self.seed,
                              act_bits=self.acts, fmt=self.fmt)

    def ptbitnet_ternary(self) -> TernaryConfig:
        """The ternary layout pt-bitnet writes (groups of group_size, fitted scales)."""
        return TernaryConfig(granularity="per_group", group_size=self.group_size, scale_mode="fit",
                             act_bits=self.acts)

    def ternary(self) -> TernaryConfig:
        return TernaryConfig(granularity=self.granularity, group_size=self.group_size, scale_mode=self.scale_mode,
                             act_bits=self.acts)

    def to_dict(self) -> dict:
        return asdict(self)


def trained_act_bits(source, default=8):
    """The activation bits a ``ternlm train`` model (or run directory) was trained with, else ``default``."""
    import json

    from ternlm.models.sources import run_model_dir

    p = run_model_dir(Path(str(source)).expanduser())
    f = p / "ternlm_training.json"
    if not f.is_file():
        return default
    try:
        bits = json.loads(f.read_text()).get("act_bits", default)
    except (OSError, ValueError):
        raise TernlmError(f"cannot read {f}") from None
    if bits not in ACT_BITS:
        raise TernlmError(f"{f}: bad act_bits {bits!r}")
    return bits


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

    cfg = (cfg or QuantizeConfig()).resolve(source)
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
    from ternlm.nn.surgery import select_targets

    cfg = (cfg or QuantizeConfig()).resolve(source)
    check_output_dir(out_dir)
    if resume and stream is False:
        raise TernlmError("--resume continues a streaming run; it cannot be combined with stream=False")
    if stream is None:
        stream = resume or _should_stream(source, cfg, gguf_file, random_init)
    if stream and cfg.budget_bpw is not None:
        raise TernlmError("--budget-bpw runs in memory (it measures every layer on the whole model); drop --stream")
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
    import json

    from ternlm.data.text import load_text
    from ternlm.ptq import calibration_ids

    if cfg.budget_bpw is not None:
        from ternlm.data.text import check_source

        check_source(cfg.calib, "calibration text")
    model, tokenizer = load(source, gguf_file=gguf_file, random_init=random_init)
    text = None
    if cfg.method == "pt-bitnet" or cfg.budget_bpw is not None:
        text = load_text(cfg.calib, split=cfg.calib_split)
        if tokenizer is None:
            raise TernlmError(f"no tokenizer files in {source}: calibration needs one to read the calibration text")
    extra, keep = {}, []
    if cfg.budget_bpw is not None:
        from ternlm.ptq.budget import plan_budget

        seq = min(cfg.seq_len, cfg.budget_tokens)
        ids = calibration_ids(tokenizer, text, cfg.budget_tokens // seq * seq, seq, cfg.seed)
        tern = cfg.ptbitnet_ternary() if cfg.method == "pt-bitnet" else cfg.ternary()
        targets = None if cfg.method == "pt-bitnet" else select_targets(
            model, QuantConfig(weights=cfg.ternary(), include=cfg.include, exclude=cfg.exclude))
        bplan = plan_budget(model, ids, cfg.budget_bpw, tern, cfg.fmt, targets=targets, progress=progress)
        keep = bplan.int8
        extra[BUDGET_LOG] = json.dumps(bplan.to_dict(), indent=2) + "\n"
    if cfg.method == "absmean":
        from ternlm.nn.int8_linear import Int8RowLinear
        from ternlm.nn.surgery import replace_module

        qc = QuantConfig(weights=cfg.ternary(), include=cfg.include, exclude=cfg.exclude + tuple(keep))
        convert(model, qc, fmt=cfg.fmt, act_bits=cfg.act_bits)
        for k in keep:  # kept at int8 rows by the bits budget
            replace_module(model, k, Int8RowLinear.from_module(model.get_submodule(k), 8 if cfg.act_bits == 8 else None))
        from ternlm.moe.experts import convert_experts

        convert_experts(model, cfg.ternary(), cfg.fmt)  # GPT-OSS 3-D experts; a no-op for dense models
        return save_pretrained(model, tokenizer, out_dir, float_dtype=cfg.float_dtype, embed_dtype=cfg.embed_dtype,
                               extra_files=extra)

    from ternlm.ptq import ptbitnet_quantize

    pcfg = cfg.ptbitnet()
    ids = calibration_ids(tokenizer, text, pcfg.calib_tokens, pcfg.seq_len, pcfg.seed)
    log = ptbitnet_quantize(model, ids, pcfg, progress=progress, keep=keep)
    log.update(source=str(source), calib=str(cfg.calib), quantize_config=cfg.to_dict())
    extra[PTQ_LOG] = json.dumps(log, indent=2, default=str) + "\n"
    return save_pretrained(model, tokenizer, out_dir, float_dtype=cfg.float_dtype, embed_dtype=cfg.embed_dtype,
                           extra_files=extra)
