"""Text generation with streamed output and a tokens/s measurement.

Loads a ternlm checkpoint (packed ternary layers) when the directory holds
``ternlm_quantization.json``, any other causal LM otherwise, and decodes with Hugging Face
``generate`` (KV cache on) so greedy, temperature, top-k and top-p sampling behave as users expect.
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

    def __post_init__(self):
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


def main_generate(model_path, prompt, cfg: GenerateConfig, gguf_file=None, out=sys.stdout) -> dict:
    model, tok = load_for_generation(model_path, gguf_file)
    out.write(prompt)
    out.flush()
    res = generate(model, tok, prompt, cfg, stream=out)
    rate = f"{res['decode_tok_s']:.1f} tok/s decode" if res["decode_tok_s"] else "n/a"
    print(f"\n[{res['n_new_tokens']} tokens; prompt {res['n_prompt_tokens']} tokens in "
          f"{res['prefill_seconds'] * 1e3:.0f} ms; {rate}]", file=sys.stderr)
    return res
