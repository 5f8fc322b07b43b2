"""Text samples from a causal LM, for eyeballing what quantization did to fluency."""

from __future__ import annotations

from typing import Sequence

import torch

from ternlm.errors import TernlmError
from ternlm.eval.classification import eval_mode, model_device


def generate_samples(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 40,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[dict]:
    """Complete each prompt with HF ``generate``; returns ``[{prompt, completion}, ...]``.

    Greedy by default. With ``do_sample=True``, ``temperature``/``top_k``/``top_p`` apply; a None
    leaves the default of the model's generation config, else of transformers (top_k=50,
    top_p=1.0). ``top_k=0`` turns top-k filtering off.
    Each prompt is generated on its own, unpadded, after seeding torch with ``seed``, so a
    completion depends only on (prompt, seed) and not on the other prompts. The global RNG state is
    restored afterwards. The completion holds only the new tokens, special tokens dropped.
    """
    from ternlm.generate import GenerateConfig, hf_generate

    if max_new_tokens < 1:
        raise TernlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise TernlmError(f"temperature must be > 0 when sampling, got {temperature}")
    gcfg = model.generation_config if getattr(model, "generation_config", None) is not None else None
    if do_sample:
        # None: the model's generation config, else transformers' defaults (top_k=50, top_p=1.0)
        top_k = top_k if top_k is not None else (getattr(gcfg, "top_k", None) if gcfg is not None else None) or 50
        top_p = top_p if top_p is not None else (getattr(gcfg, "top_p", None) if gcfg is not None else None) or 1.0
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                         top_k=top_k or 0 if do_sample else 0, top_p=top_p if do_sample else 1.0, seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    out = []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            r = hf_generate(model, enc.input_ids, cfg, pad_token_id=pad, attention_mask=enc.attention_mask)
            completion = tokenizer.decode(r["tokens"], skip_special_tokens=True)
            out.append({"prompt": prompt, "completion": completion})
    return out
