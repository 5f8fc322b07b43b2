"""Where a model comes from: a local directory, a GGUF file (or a directory holding one) or a hub
id, resolved once into what ``from_pretrained`` takes; and the tokenizer loader every path shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ternlm.data.text import looks_like_hub_id
from ternlm.errors import TernlmError

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model")


@dataclass
class Source:
    """Where a model comes from, after resolving paths and GGUF files."""

    ref: str  # what from_pretrained receives: a local directory or a hub id
    gguf_file: str | None
    local: bool

    def describe(self) -> str:
        return f"{self.ref}/{self.gguf_file}" if self.gguf_file else self.ref


def one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if len(msg) <= limit else msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def has_hf_weights(directory: Path) -> bool:
    return any((directory / f).is_file() for f in _WEIGHT_FILES) or any(directory.glob("*.safetensors"))


def run_model_dir(path: Path) -> Path:
    """A ``ternlm train`` run directory holds its model in ``model/``: that directory; else ``path``."""
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def resolve_source(name_or_path, gguf_file: str | None) -> Source:
    """Turn a path or hub id (+ optional GGUF name) into something from_pretrained accepts."""
    path = run_model_dir(Path(name_or_path).expanduser())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TernlmError(f"{path} is a file: pass the model directory (or a .gguf file)")
        if gguf_file is not None and gguf_file != path.name:
            raise TernlmError(f"both a GGUF path ({path}) and gguf_file={gguf_file!r} given")
        return Source(str(path.parent), path.name, True)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise TernlmError(f"no GGUF file {gguf_file!r} in {path}")
            return Source(str(path), gguf_file, True)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        # Prefer transformers-format weights when both exist: they are lossless, a GGUF rarely is.
        if len(ggufs) == 1 and not (has_hf_weights(path) and (path / "config.json").is_file()):
            return Source(str(path), ggufs[0], True)
        if not (path / "config.json").is_file():
            extra = f" and {len(ggufs)} .gguf files: pass gguf_file=" if len(ggufs) > 1 else ""
            raise TernlmError(f"no config.json in {path} (not a model directory{extra})")
        return Source(str(path), None, True)
    if not looks_like_hub_id(str(name_or_path)):
        raise TernlmError(f"no such file or directory: {name_or_path}")
    return Source(str(name_or_path), gguf_file, False)


def hub_load_error(src: Source, e: Exception) -> TernlmError:
    from ternlm.hub import hub_error

    return hub_error(src.ref, "model", e)


def hub_load_kwargs(src: Source) -> dict:
    if src.local:
        return {}
    from ternlm.hub import hub_kwargs

    return hub_kwargs()


def load_tokenizer(name_or_path: str | Path, *, gguf_file: str | None = None):
    """AutoTokenizer from a directory, GGUF file or hub id; pad = eos when the model has no pad token."""
    from transformers import AutoTokenizer

    src = resolve_source(name_or_path, gguf_file)
    has_files = any((Path(src.ref) / f).is_file() for f in _TOKENIZER_FILES)
    if src.local and src.gguf_file is None and not has_files:
        raise TernlmError(f"no tokenizer files in {src.ref} (expected tokenizer.json or vocab.json)")
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(src.ref, **kwargs, **hub_load_kwargs(src))
    except Exception as e:
        if not src.local:
            raise hub_load_error(src, e) from None
        raise TernlmError(f"cannot load the tokenizer from {src.describe()}: {one_line(e)}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        # GPT-2 ships without a pad token; padding with eos is the standard choice and is masked out.
        tok.pad_token = tok.eos_token
    return tok


# Tokenizer classes whose whole behaviour is the tokenizer.json pipeline (no Python-side additions).
_LIGHT_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast")


class LightTokenizer:
    """The slice of a Hugging Face fast tokenizer that generation uses (encode a prompt, decode ids,
    the eos / pad ids), on the ``tokenizers`` library alone: ``AutoTokenizer`` imports enough of
    transformers and its integrations to cost ~150 MB of RSS, more than a small ternary model.
    Built only when the tokenizer is exactly its tokenizer.json (``light_tokenizer``)."""

    def __init__(self, tok, eos_token: str | None, pad_token: str | None):
        self._tok = tok
        self.eos_token = eos_token
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None
        self.pad_token = pad_token or eos_token
        self.pad_token_id = tok.token_to_id(self.pad_token) if self.pad_token else None

    def __call__(self, text: str, return_tensors: str | None = None) -> dict:
        import torch

        ids = self._tok.encode(text).ids
        if return_tensors == "pt":
            t = torch.tensor([ids], dtype=torch.long)
            return _Encoding(input_ids=t, attention_mask=torch.ones_like(t))
        return _Encoding(input_ids=ids, attention_mask=[1] * len(ids))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class _Encoding(dict):
    __getattr__ = dict.__getitem__


def _token_str(v) -> str | None:
    if isinstance(v, dict):  # serialized AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


def light_tokenizer(directory: str | Path) -> LightTokenizer | None:
    """A ``LightTokenizer`` for a local directory whose tokenizer is fully described by its
    tokenizer.json (a tokenizers-backed class, no bos/eos added on the Python side, no clean-up of
    spaces when decoding); None otherwise (then use ``load_tokenizer``)."""
    import json

    d = Path(directory).expanduser()
    tj, tc = d / "tokenizer.json", d / "tokenizer_config.json"
    if not tj.is_file():
        return None
    try:
        conf = json.loads(tc.read_text()) if tc.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(conf, dict) or conf.get("tokenizer_class", "PreTrainedTokenizerFast") not in _LIGHT_CLASSES:
        return None
    if conf.get("add_bos_token") or conf.get("add_eos_token") or conf.get("clean_up_tokenization_spaces"):
        return None
    if conf.get("add_prefix_space") or conf.get("errors", "replace") != "replace":
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
    except Exception:
        return None
    eos = _token_str(conf.get("eos_token"))
    if eos is not None and tok.token_to_id(eos) is None:
        return None
    return LightTokenizer(tok, eos, _token_str(conf.get("pad_token")))
