"""Load tokenizers, causal LMs and sequence classifiers from a local directory, a GGUF file or the hub.

Every failure a user can cause (a wrong path, a directory without weights, a truncated weights
file, an encoder model asked to act as a causal LM, no network) becomes a one-line TernlmError.
Weights that silently fail to load are treated as errors too: a randomly initialised backbone
would make every quantization number meaningless.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch

from ternlm.checkpoint import save_model  # noqa: F401  (re-exported: the float-model saver)
from ternlm.errors import TernlmError
from ternlm.models.sources import (Source, has_hf_weights, hub_load_error, hub_load_kwargs, load_tokenizer, one_line,
                                   resolve_source)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    # transformers renamed torch_dtype to dtype in 4.56; support both ends of the pinned range.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_config(src: Source, **overrides):
    from transformers import AutoConfig

    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(src.ref, **kwargs, **hub_load_kwargs(src), **overrides)
    except Exception as e:  # unreadable JSON, unknown model_type, network: all user-fixable
        if not src.local:
            raise hub_load_error(src, e) from None
        raise TernlmError(f"cannot read the model config in {src.describe()}: {one_line(e)}") from None


def _check_head(config, task: str) -> None:
    """Refuse architectures that have no head for ``task`` (or only a misleading one)."""
    from transformers.models.auto import modeling_auto as ma

    names = {"causal-lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             "classification": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}[task]
    model_type = getattr(config, "model_type", "?")
    if model_type not in names:
        raise TernlmError(f"model type {model_type!r} has no {task} head in transformers")
    # BERT-like encoders have a *ForCausalLM class for decoder use, but as loaded they are masked
    # LMs; treating one as a causal LM would give meaningless perplexities.
    if task == "causal-lm":
        if getattr(config, "is_encoder_decoder", False):
            raise TernlmError(f"model type {model_type!r} is an encoder-decoder, not a causal LM")
        if model_type in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
            raise TernlmError(f"model type {model_type!r} is an encoder (masked LM), not a causal LM")


def _pad_token_id(config, src: Source) -> int | None:
    """The config's eos id (GPT-2's tokenizer pads with eos too), else the tokenizer's pad id."""
    eos = config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is not None:
        return int(eos)
    try:
        return load_tokenizer(src.ref, gguf_file=src.gguf_file).pad_token_id
    except TernlmError:
        return None  # unpadded batches (and batch size 1) still work


def _load(auto_cls, name_or_path, *, task: str, gguf_file, random_init: bool, dtype, config_overrides: dict,
          new_head_ok: bool):
    src = resolve_source(name_or_path, gguf_file)
    if src.local and src.gguf_file is None and not random_init and not has_hf_weights(Path(src.ref)):
        raise TernlmError(f"no weights in {src.ref} (pass random_init=True / --random-init to start from "
                          f"random weights)")
    dtype_kw = _dtype_kwarg(dtype)
    if random_init:
        config = _load_config(src, **config_overrides)
        _check_head(config, task)
        model = auto_cls.from_config(config, **dtype_kw)
        return _finish(model, task, src)

    # NOTE: parsing a GGUF's metadata takes seconds and from_pretrained already parses it twice
    # (config, then tensors), so for GGUF the config is not read separately and the head is checked
    # on the loaded model instead.
    if src.gguf_file:
        kwargs = {"gguf_file": src.gguf_file, **config_overrides}
    else:
        config = _load_config(src, **config_overrides)
        _check_head(config, task)
        kwargs = {"config": config}
    try:
        # A classifier built from an LM checkpoint gets a fresh head on purpose; transformers' load
        # report about it is noise. Missing backbone weights are still caught below.
        with quiet_transformers(new_head_ok):
            model, info = auto_cls.from_pretrained(src.ref, output_loading_info=True, **kwargs, **dtype_kw,
                                                   **hub_load_kwargs(src))
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):  # the auto class has no head for this model
            raise TernlmError(f"the model in {src.describe()} has no {task} head in transformers") from None
        raise _load_error(src, e) from None
    except Exception as e:  # truncated/corrupt files, shape mismatches, network
        raise _load_error(src, e) from None
    if src.gguf_file:
        _check_head(model.config, task)

    missing = set(info.get("missing_keys") or ())
    if new_head_ok:
        # A fresh task head is expected when a classifier starts from an LM checkpoint; a missing
        # backbone weight is not.
        prefix = model.base_model_prefix + "."
        missing = {k for k in missing if k.startswith(prefix)}
    if missing:
        example = sorted(missing)[0]
        raise TernlmError(f"weights in {src.describe()} do not match its config: {len(missing)} tensors "
                          f"missing (e.g. {example})")
    return _finish(model, task, src)


@contextlib.contextmanager
def quiet_transformers(quiet: bool = True):
    """transformers logs errors only and shows no progress bars, while ``quiet`` (its GGUF reader's
    bar is a plain tqdm of its own module, so it is switched off there)."""
    if not quiet:
        yield
        return
    import functools

    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf package: no GGUF reader, no bar
        gguf_utils = None
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(prev)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar


def _load_error(src: Source, e: Exception) -> TernlmError:
    if not src.local:
        return hub_load_error(src, e)
    return TernlmError(f"cannot load weights from {src.describe()}: {one_line(e)}")


def _finish(model, task: str, src: Source):
    if task == "classification" and model.config.pad_token_id is None:
        # GPT-2 and Llama classifiers pool the last non-pad token and refuse batches without a pad id;
        # they read config.pad_token_id at forward time, so setting it after loading is enough.
        model.config.pad_token_id = _pad_token_id(model.config, src)
    return model.eval()


def from_pretrained(directory, *, kernel: str = "auto"):
    """Deprecated: ``ternlm.load(directory).model`` (the name ``ternlm.from_pretrained`` had before
    ``ternlm.load`` read every kind of model)."""
    import warnings

    warnings.warn("ternlm.from_pretrained is deprecated; use ternlm.load(path), which returns (model, tokenizer)",
                  DeprecationWarning, stacklevel=2)
    return load(directory, kernel=kernel, tokenizer=False).model


def load_causal_lm(name_or_path: str | Path, *, gguf_file: str | None = None, random_init: bool = False,
                   dtype: torch.dtype = torch.float32):
    """``load(name_or_path, task="causal-lm").model``: a causal LM in eval mode, without its tokenizer.

    random_init builds the architecture from the config with fresh weights, drawn from torch's
    global RNG, so seed it first for a reproducible model.
    """
    return load(name_or_path, gguf_file=gguf_file, random_init=random_init, dtype=dtype, tokenizer=False).model


def load_classifier(name_or_path: str | Path, *, num_labels: int = 2, gguf_file: str | None = None,
                    random_init: bool = False, dtype: torch.dtype = torch.float32):
    """``load(name_or_path, task="classification").model``: a sequence classifier in eval mode; from an
    LM checkpoint the backbone loads and the head is new. ``config.pad_token_id`` is filled from the
    eos token when missing (GPT-2), so padded batches work.
    """
    return load(name_or_path, task="classification", num_labels=num_labels, gguf_file=gguf_file,
                random_init=random_init, dtype=dtype, tokenizer=False).model


# ---------------------------------------------------------------------------------------------
# The one loader

KINDS = ("ternlm", "ternlm-gguf", "gguf", "hf", "hub")
TASKS = ("causal-lm", "classification")


class Loaded(NamedTuple):
    """What ``load`` returns; unpacks as ``model, tokenizer = ternlm.load(...)``."""

    model: object
    tokenizer: object  # None when the source has no tokenizer files


def _is_ternlm_gguf(path: Path) -> bool:
    """A GGUF written by ``ternlm export`` (it carries ternlm's quantization record)."""
    from ternlm.export.gguf import KEY_RECORD

    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated header
        raise TernlmError(f"{path} is not a readable GGUF file: {one_line(e)}") from None
    return KEY_RECORD in reader.fields


def source_kind(name_or_path, gguf_file: str | None = None) -> str:
    """Which kind of model ``name_or_path`` names (one of ``KINDS``), or a TernlmError.

    ternlm: a packed checkpoint directory; ternlm-gguf: a GGUF file written by ``ternlm export``;
    gguf: any other GGUF (loaded dequantized); hf: a Hugging Face model directory; hub: a hub id.
    """
    from ternlm.checkpoint import QUANT_FILE

    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and (path / QUANT_FILE).is_file():
        return "ternlm"
    src = resolve_source(name_or_path, gguf_file)
    if src.gguf_file:
        return "ternlm-gguf" if _is_ternlm_gguf(Path(src.ref) / src.gguf_file) else "gguf"
    return "hf" if src.local else "hub"


def _attach_knowledge(model, name_or_path, kind: str) -> None:
    """Knowledge tokens saved beside a local checkpoint come back with it."""
    if kind in ("ternlm", "hf"):
        from ternlm.nn.knowledge import load_knowledge

        load_knowledge(model, name_or_path)


def _optional_tokenizer(name_or_path, gguf_file=None):
    try:
        return load_tokenizer(name_or_path, gguf_file=gguf_file)
    except TernlmError:
        return None  # a bare config directory still loads; callers that need text say so


def load(name_or_path: str | Path, *, task: str = "causal-lm", gguf_file: str | None = None,
         random_init: bool = False, dtype: torch.dtype = torch.float32, num_labels: int = 2,
         kernel: str = "auto", tokenizer: bool = True) -> Loaded:
    """Load a model and its tokenizer from anything ternlm reads: the one loader.

    name_or_path: a ternlm packed checkpoint directory (``ternlm quantize``), a GGUF file written
        by ``ternlm export`` (packed ternary again), any other GGUF file or directory holding one
        (dequantized), a Hugging Face model directory, or a hub id.
    task: ``causal-lm`` or ``classification`` (a fresh sequence-classification head on the LM;
        plain models only).
    random_init: build the architecture from the config with fresh weights (plain models).
    kernel: packed layers' kernel, ``auto`` or ``reference`` (packed models).
    tokenizer: also load the tokenizer (``Loaded.tokenizer`` is None when there is none).
    """
    if task not in TASKS:
        raise TernlmError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    from ternlm.models.sources import run_model_dir

    if Path(str(name_or_path)).expanduser().is_dir():  # a ternlm train run: its model/ directory
        name_or_path = run_model_dir(Path(str(name_or_path)).expanduser())
    kind = source_kind(name_or_path, gguf_file)
    if kind in ("ternlm", "ternlm-gguf"):
        if task != "causal-lm":
            raise TernlmError(f"{name_or_path} is a packed ternary causal LM; task={task!r} needs a float model "
                              f"(pass the model it was quantized from)")
        if random_init:
            raise TernlmError(f"{name_or_path} is a packed ternary checkpoint; random_init needs a config source")
        if kind == "ternlm":
            from ternlm.checkpoint import from_pretrained

            model = from_pretrained(name_or_path, kernel=kernel)
            _attach_knowledge(model, name_or_path, kind)
            return Loaded(model, _optional_tokenizer(name_or_path) if tokenizer else None)
        from ternlm.export.gguf import from_gguf

        src = resolve_source(name_or_path, gguf_file)
        path = Path(src.ref) / src.gguf_file
        model = from_gguf(path)
        if kernel != "auto":
            from ternlm.nn.surgery import ternary_linears

            for _, m in ternary_linears(model):
                m.kernel = kernel
        return Loaded(model, _optional_tokenizer(src.ref, src.gguf_file) if tokenizer else None)

    if task == "causal-lm":
        from transformers import AutoModelForCausalLM as auto_cls

        extra = dict(config_overrides={}, new_head_ok=False)
    else:
        from transformers import AutoModelForSequenceClassification as auto_cls

        extra = dict(config_overrides={"num_labels": num_labels}, new_head_ok=True)
    model = _load(auto_cls, name_or_path, task=task, gguf_file=gguf_file, random_init=random_init, dtype=dtype,
                  **extra)
    _attach_knowledge(model, name_or_path, kind)
    return Loaded(model, _optional_tokenizer(name_or_path, gguf_file) if tokenizer else None)
