"""Text generation with streamed output and a tokens/s measurement.

Loads a ternlm checkpoint (packed ternary layers) when the directory holds
``ternlm_quantization.json``, any other causal LM otherwise. Two engines:

    hf    Hugging Face ``generate`` (KV cache on), any architecture
    fast  ``ternlm.runtime.GPT2Runtime``: static KV cache, packed kernels called directly, optional
          int8 LM head; GPT-2 architecture only, same sampling order as HF (temperature, top-k, top-p)

``auto`` picks ``fast`` for a GPT-2 ternlm checkpoint and ``hf`` otherwise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ternlm.errors import TernlmError


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int = 0
    engine: str = "auto"       # auto | hf | fast
    head: str = "fp32"         # fast engine: LM-head storage fp32 | fp16 | bf16 | int8

    def __post_init__(self):
        if self.engine not in ("auto", "hf", "fast"):
            raise TernlmError(f"unknown engine {self.engine!r}; choose auto, hf or fast")
        if self.head not in ("fp32", "fp16", "bf16", "int8"):
            raise TernlmError(f"unknown head {self.head!r}; choose fp32, fp16, bf16 or int8")
        if self.max_new_tokens < 1:
            raise TernlmError("max_new_tokens must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise TernlmError("temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")

    def to_dict(self) -> dict:
        return asdict(self)


def load_for_generation(name_or_path, gguf_file=None):
    """(model, tokenizer): a ternlm packed checkpoint if the directory is one, else a plain LM."""
    from ternlm.models.loading import load_causal_lm, load_tokenizer

    p = Path(str(name_or_path))
    if p.is_dir() and (p / "ternlm_quantization.json").is_file():
        from ternlm.checkpoint import from_pretrained

        return from_pretrained(p), load_tokenizer(p)
    return load_causal_lm(name_or_path, gguf_file=gguf_file), load_tokenizer(name_or_path, gguf_file=gguf_file)


def generate(model, tokenizer, prompt: str, cfg: GenerateConfig | None = None, *, stream=None) -> dict:
    """Generate a continuation; stream decoded text to ``stream`` (a file) as it is produced.

    Returns {text, n_prompt_tokens, n_new_tokens, prefill_seconds, decode_seconds, decode_tok_s}.
    The first new token's time counts as prefill (prompt processing); decode tok/s covers the rest.
    """
    import torch
    from transformers import TextStreamer

    cfg = cfg or GenerateConfig()
    if not prompt:
        raise TernlmError("empty prompt")
    enc = tokenizer(prompt, return_tensors="pt")
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if ctx and enc.input_ids.shape[1] + cfg.max_new_tokens > ctx:
        raise TernlmError(f"prompt ({enc.input_ids.shape[1]} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                          f"exceeds the model's context ({ctx})")

    times = []

    class _Clock(TextStreamer):
        def put(self, value):
            times.append(time.perf_counter())
            super().put(value)

    streamer = _Clock(tokenizer, skip_prompt=True) if stream is not None else None
    if streamer is not None:
        streamer.on_finalized_text = lambda text, stream_end=False: (stream.write(text + ("\n" if stream_end else "")),
                                                                      stream.flush())
    sample = cfg.temperature > 0
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, use_cache=True,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, streamer=streamer, **kw)
    t1 = time.perf_counter()
    new = out[0, enc.input_ids.shape[1]:]
    n_new = int(new.numel())
    # times[0] is the prompt echo, times[1] the first new token (when streaming)
    t_first = times[1] if len(times) > 1 else t0 + (t1 - t0) / max(n_new, 1)
    decode_s = t1 - t_first
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "n_prompt_tokens": int(enc.input_ids.shape[1]),
            "n_new_tokens": n_new, "prefill_seconds": t_first - t0, "decode_seconds": decode_s,
            "decode_tok_s": (n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else None,
            "total_tok_s": n_new / (t1 - t0)}


def generate_fast(model, tokenizer, prompt: str, cfg: GenerateConfig | None = None, *, stream=None) -> dict:
    """``generate`` on ternlm's GPT-2 decode loop (``ternlm.runtime.GPT2Runtime``); same result keys."""
    from ternlm.runtime.gpt2 import GPT2Runtime, RuntimeConfig

    cfg = cfg or GenerateConfig()
    if not prompt:
        raise TernlmError("empty prompt")
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    ctx = model.config.n_positions
    if ids.numel() + cfg.max_new_tokens > ctx:
        raise TernlmError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                          f"exceeds the model's context ({ctx})")
    rt = GPT2Runtime(model, RuntimeConfig(head=cfg.head, max_seq_len=ids.numel() + cfg.max_new_tokens))
    pending: list[int] = []  # tokens not yet printed: a token may end mid-character (byte-level BPE)

    def on_token(tok: int) -> None:
        pending.append(tok)
        piece = tokenizer.decode(pending, skip_special_tokens=True)
        if stream is not None and not piece.endswith("\ufffd"):
            stream.write(piece)
            stream.flush()
            pending.clear()

    r = rt.generate(ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    seed=cfg.seed, eos_token_id=tokenizer.eos_token_id, on_token=on_token)
    text = tokenizer.decode(r["tokens"], skip_special_tokens=True)
    if stream is not None:
        stream.write(tokenizer.decode(pending, skip_special_tokens=True) + "\n")
        stream.flush()
    total = r["prefill_seconds"] + r["decode_seconds"]
    return {"text": text, "n_prompt_tokens": r["n_prompt_tokens"], "n_new_tokens": r["n_new_tokens"],
            "prefill_seconds": r["prefill_seconds"], "decode_seconds": r["decode_seconds"],
            "decode_tok_s": r["decode_tok_s"], "total_tok_s": r["n_new_tokens"] / total if total > 0 else None,
            "engine": "fast"}


def _pick_engine(model, cfg: GenerateConfig) -> str:
    gpt2 = getattr(model.config, "model_type", None) == "gpt2"
    if cfg.engine == "fast" and not gpt2:
        raise TernlmError(f"the fast engine runs GPT-2 models; this is {model.config.model_type!r} (use --engine hf)")
    if cfg.engine == "auto":
        from ternlm.convert import ternary_linears

        return "fast" if gpt2 and ternary_linears(model) else "hf"
    return cfg.engine


def main_generate(model_path, prompt, cfg: GenerateConfig, gguf_file=None, out=sys.stdout) -> dict:
    model, tok = load_for_generation(model_path, gguf_file)
    engine = _pick_engine(model, cfg)
    if engine == "hf" and cfg.head != "fp32":
        raise TernlmError("--head applies to the fast engine only")
    out.write(prompt)
    out.flush()
    res = (generate_fast if engine == "fast" else generate)(model, tok, prompt, cfg, stream=out)
    rate = f"{res['decode_tok_s']:.1f} tok/s decode" if res["decode_tok_s"] else "n/a"
    print(f"[{engine} engine; {res['n_new_tokens']} tokens; prompt {res['n_prompt_tokens']} tokens in "
          f"{res['prefill_seconds'] * 1e3:.0f} ms; {rate}]", file=sys.stderr)
    return res
