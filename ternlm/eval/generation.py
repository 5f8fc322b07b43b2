"""Text samples from a causal LM, for eyeballing what quantization did to fluency."""

from __future__ import annotations

from typing import Sequence

import torch

from ternlm.errors import TernlmError
from ternlm.eval.classification import eval_mode, model_device
from ternlm.eval.perplexity import model_context_length


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
    if max_new_tokens < 1:
        raise TernlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise TernlmError(f"temperature must be > 0 when sampling, got {temperature}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
    if do_sample:
        gen_kw["temperature"] = temperature
        if top_k is not None:
            gen_kw["top_k"] = top_k
        if top_p is not None:
            gen_kw["top_p"] = top_p

    device = model_device(model)
    context = model_context_length(model)
    devices = [device] if device.type == "cuda" else []
    out = []
    with eval_mode(model), torch.inference_mode(), torch.random.fork_rng(devices=devices):
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            n_prompt = enc.input_ids.shape[1]
            if n_prompt == 0:
                raise TernlmError("empty prompt: give at least one token of text")
            if context is not None and n_prompt + max_new_tokens > context:
                raise TernlmError(
                    f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                    f"the model context ({context})"
                )
            torch.manual_seed(seed)
            ids = model.generate(**enc, **gen_kw)  # (1, n_prompt + n_new)
            completion = tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
            out.append({"prompt": prompt, "completion": completion})
    return out
