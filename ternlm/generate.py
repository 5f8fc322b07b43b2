"""Text generation with streamed output and a tokens/s measurement.

Loads any model ``ternlm.load`` reads (a packed checkpoint, a ternlm GGUF, a plain causal LM).
Two engines:

    hf    Hugging Face ``generate`` (KV cache on), any architecture; ``hf_generate`` is the one
          wrapper around it (the generate command, evaluation samples and the benchmark use it)
    fast  ``ternlm.runtime.DecodeEngine``: static KV cache, packed kernels called directly, optional
          int8 LM head; GPT-2 and Llama-family architectures (``ternlm.runtime.ARCHS``), same sampling
          order as HF (temperature, top-k, top-p)

``auto`` picks ``fast`` for any architecture the engine covers (ternary or float linears) and ``hf``
otherwise, saying so in one line on stderr.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ternlm.config import HEADS, check_sampling
from ternlm.errors import TernlmError

ENGINES = ("auto", "hf", "fast")


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int = 0
    engine: str = "auto"       # auto | hf | fast
    head: str = "auto"         # fast engine: LM-head storage fp32 | fp16 | bf16 | int8 | auto (as stored)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise TernlmError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.head not in HEADS:
            raise TernlmError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.max_new_tokens < 1:
            raise TernlmError("max_new_tokens must be >= 1")
        check_sampling(self.temperature, self.top_k, self.top_p)

    def to_dict(self) -> dict:
        return asdict(self)


def check_context(model, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse a prompt + continuation longer than the model's position table, before any work."""
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    check_context_length(n_prompt, max_new_tokens, ctx)


def check_context_length(n_prompt: int, max_new_tokens: int, ctx: int | None) -> None:
    if n_prompt < 1:
        raise TernlmError("empty prompt: give at least one token of text")
    if ctx and n_prompt + max_new_tokens > ctx:
        raise TernlmError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context ({ctx})")


class _Clock:
    """A ``generate`` streamer: the time each chunk arrives; new tokens go to ``on_token``."""

    def __init__(self, on_token: Callable[[int], None] | None):
        self.t: list[float] = []
        self.on_token = on_token

    def put(self, value):
        self.t.append(time.perf_counter())
        if self.on_token is not None and len(self.t) > 1:  # the first put is the prompt echo
            for tok in value.reshape(-1).tolist():
                self.on_token(int(tok))

    def end(self):
        pass


def hf_generate(model, input_ids, cfg: GenerateConfig | None = None, *, pad_token_id: int | None = None,
                on_token: Callable[[int], None] | None = None, ignore_eos: bool = False, **inputs) -> dict:
    """The one wrapper around Hugging Face ``model.generate`` (batch 1, KV cache on).

    Greedy when ``cfg.temperature`` is 0, else sampling with temperature / top-k / top-p after
    ``torch.manual_seed(cfg.seed)``. ``on_token`` sees each new token as it is produced;
    ``ignore_eos`` always produces ``max_new_tokens`` (benchmarks). Extra ``inputs`` (an attention
    mask) go to ``generate``. Returns {tokens (new ids), n_prompt_tokens, n_new_tokens,
    prefill_seconds (until the first new token), decode_seconds, decode_tok_s}.
    """
    import torch

    cfg = cfg or GenerateConfig()
    n_prompt = int(input_ids.shape[-1])
    check_context(model, n_prompt, cfg.max_new_tokens)
    sample = cfg.temperature > 0
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, use_cache=True, pad_token_id=pad_token_id)
    if sample:
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if ignore_eos:
        kw["min_new_tokens"] = cfg.max_new_tokens
    clock = _Clock(on_token)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids.reshape(1, -1), streamer=clock, **inputs, **kw)
    t1 = time.perf_counter()
    new = out[0, n_prompt:].tolist()
    t_first = clock.t[1] if len(clock.t) > 1 else t1
    decode_s = t1 - t_first
    return {"tokens": new, "n_prompt_tokens": n_prompt, "n_new_tokens": len(new),
            "prefill_seconds": t_first - t0, "decode_seconds": decode_s,
            "decode_tok_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else None}


class _TextStream:
    """Decode tokens to ``stream`` as they come, holding back a token that ends mid-character."""

    def __init__(self, tokenizer, stream):
        self.tokenizer, self.stream, self.pending = tokenizer, stream, []

    def __call__(self, tok: int) -> None:
        self.pending.append(tok)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if self.stream is not None and not piece.endswith("\ufffd"):
            self.stream.write(piece)
            self.stream.flush()
            self.pending.clear()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write(self.tokenizer.decode(self.pending, skip_special_tokens=True) + "\n")
            self.stream.flush()


def _result(tokenizer, r: dict, engine: str) -> dict:
    total = r["prefill_seconds"] + r["decode_seconds"]
    return {"text": tokenizer.decode(r["tokens"], skip_special_tokens=True), "n_prompt_tokens": r["n_prompt_tokens"],
            "n_new_tokens": r["n_new_tokens"], "prefill_seconds": r["prefill_seconds"],
            "decode_seconds": r["decode_seconds"], "decode_tok_s": r["decode_tok_s"],
            "total_tok_s": r["n_new_tokens"] / total if total > 0 else None, "engine": engine}


def generate(model, tokenizer, prompt: str, cfg: GenerateConfig | None = None, *, stream=None) -> dict:
    """Generate a continuation with HF ``generate``; stream decoded text to ``stream`` (a file).

    Returns {text, n_prompt_tokens, n_new_tokens, prefill_seconds, decode_seconds, decode_tok_s,
    total_tok_s, engine}. The first new token's time counts as prefill; decode tok/s covers the rest.
    """
    if not prompt:
        raise TernlmError("empty prompt")
    enc = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text = _TextStream(tokenizer, stream)
    r = hf_generate(model, enc.input_ids, cfg, pad_token_id=pad, on_token=text,
                    attention_mask=enc.attention_mask)
    text.close()
    return _result(tokenizer, r, "hf")


def generate_fast(model, tokenizer, prompt: str, cfg: GenerateConfig | None = None, *, stream=None) -> dict:
    """``generate`` on ternlm's decode engine (``ternlm.runtime.DecodeEngine``); same result keys.
    ``model`` may also be a ternlm checkpoint directory: the engine is then built straight from
    its tensors (``DecodeEngine.from_checkpoint``: no Hugging Face model, stored dtypes kept)."""
    cfg = cfg or GenerateConfig()
    if not prompt:
        raise TernlmError("empty prompt")
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    return _run_engine(_engine_for(model, ids.numel(), cfg), tokenizer, ids, cfg, stream)


def _engine_for(model, n_prompt: int, cfg: GenerateConfig):
    from ternlm.runtime.engine import DecodeEngine, RuntimeConfig

    rc = RuntimeConfig(head=cfg.head, max_seq_len=n_prompt + cfg.max_new_tokens)
    from ternlm.runtime.lean import Checkpoint

    if not isinstance(model, (str, Path, Checkpoint)):
        check_context(model, n_prompt, cfg.max_new_tokens)
        return DecodeEngine(model, rc)
    return DecodeEngine.from_checkpoint(model, rc)  # refuses a max_seq_len beyond the model's positions


def _run_engine(rt, tokenizer, ids, cfg: GenerateConfig, stream) -> dict:
    text = _TextStream(tokenizer, stream)
    r = rt.generate(ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    seed=cfg.seed, eos_token_id=tokenizer.eos_token_id, on_token=text)
    text.close()
    return _result(tokenizer, r, "fast")


def _pick_engine(model, cfg: GenerateConfig, log=None) -> str:
    """The engine to run: ``fast`` when asked or (``auto``) when the decode engine covers the
    architecture; ``auto`` on anything else falls back to ``hf`` with one line on ``log``."""
    from ternlm.runtime.engine import describe

    from ternlm.nn.knowledge import get_knowledge

    if cfg.engine == "hf":
        return "hf"
    if get_knowledge(model) is not None:  # the decode engine has no knowledge-token cache prefix yet
        if cfg.engine == "fast":
            raise TernlmError("the fast engine does not run models with knowledge tokens (use --engine hf)")
        return "hf"
    try:
        describe(model)
    except TernlmError as e:
        if cfg.engine == "fast":
            raise TernlmError(f"{e} (use --engine hf)") from None
        print(f"ternlm: {e}; using Hugging Face generate", file=log if log is not None else sys.stderr)
        return "hf"
    return "fast"


def main_generate(model_path, prompt, cfg: GenerateConfig, gguf_file=None, out=None) -> dict:
    from ternlm.models.loading import load
    from ternlm.models.sources import light_tokenizer, load_tokenizer

    out = out if out is not None else sys.stdout

    if not prompt:
        raise TernlmError("empty prompt")
    if cfg.engine == "hf" and cfg.head not in ("fp32", "auto"):
        raise TernlmError("--head applies to the fast engine only")
    lean = _lean_source(model_path, gguf_file, cfg)
    if lean is not None:  # a ternlm checkpoint the engine reads directly: no Hugging Face model is built
        tok = light_tokenizer(lean.directory) or load_tokenizer(lean.directory)
        ids = tok(prompt, return_tensors="pt").input_ids[0]
        check_context_length(ids.numel(), cfg.max_new_tokens, lean.arch.max_positions)
        try:
            rt = _engine_for(lean, ids.numel(), cfg)
        except TernlmError:
            rt = None  # not what the direct reader covers (or a broken file): the usual path says which
        if rt is not None:
            out.write(prompt)
            out.flush()
            res = _run_engine(rt, tok, ids, cfg, out)
            _print_rate(res, "fast")
            return res
    model, tok = load(model_path, gguf_file=gguf_file)
    if tok is None:
        raise TernlmError(f"no tokenizer files in {model_path}")
    engine = _pick_engine(model, cfg)
    if engine == "hf" and cfg.head not in ("fp32", "auto"):
        raise TernlmError("--head applies to the fast engine only")
    out.write(prompt)
    out.flush()
    res = (generate_fast if engine == "fast" else generate)(model, tok, prompt, cfg, stream=out)
    _print_rate(res, engine)
    return res


def _print_rate(res: dict, engine: str) -> None:
    rate = f"{res['decode_tok_s']:.1f} tok/s decode" if res["decode_tok_s"] else "n/a"
    print(f"[{engine} engine; {res['n_new_tokens']} tokens; prompt {res['n_prompt_tokens']} tokens in "
          f"{res['prefill_seconds'] * 1e3:.0f} ms; {rate}]", file=sys.stderr)


def _lean_source(model_path, gguf_file, cfg: GenerateConfig):
    """The checkpoint, read once (``ternlm.runtime.lean.Checkpoint``: record, config, Arch), when the fast
    engine can be built straight from it (a ternlm checkpoint of a covered architecture, with a
    tokenizer), else None (the model is then loaded as usual)."""
    from ternlm.models.loading import source_kind

    if cfg.engine == "hf" or gguf_file:
        return None
    try:
        if source_kind(model_path) != "ternlm":
            return None
        from ternlm.runtime.lean import read_checkpoint

        ck = read_checkpoint(model_path)
    except TernlmError:
        return None
    d = ck.directory
    return ck if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file() else None
