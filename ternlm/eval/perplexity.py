"""Perplexity of a causal LM: the one implementation (``ternlm eval``, the pipeline, scripts).

The protocol, as in the Hugging Face guide (https://huggingface.co/docs/transformers/perplexity):

The text is tokenized once. Window k covers tokens ``[k*stride, k*stride + max_length)``; only
the tokens not already scored by an earlier window are targets, so every token after the first
is predicted exactly once, with up to ``max_length - stride`` tokens of extra context when
``stride < max_length``.

NOTE on the count: the guide weights each window's mean loss by (#targets - 1), which is right
only when position 0 of the window is a target (the first window, or ``stride == max_length``).
Here the per-token negative log-likelihoods are summed directly, so the count is exact:
``n_tokens = seq_len - 1`` for overlapping windows and ``seq_len - n_windows`` when
``stride == max_length`` (each window's first token then has no context and is not scored).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ternlm.errors import TernlmError
from ternlm.eval.classification import eval_mode, model_device


def model_context_length(model: torch.nn.Module) -> int | None:
    """Longest sequence the model's position embeddings allow, or None if the config does not say."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        n = getattr(config, attr, None)
        if n:
            return int(n)
    return None


def _windows(seq_len: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_targets) per window; targets are the last n_targets tokens of the window."""
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return out


def perplexity(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    tokenizer,
    text: str,
    *,
    max_length: int = 512,
    stride: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Token-weighted perplexity of ``text`` under a causal LM.

    ``max_length`` is capped at the model's context length and ``stride`` at ``max_length``
    (a larger stride would skip tokens); the values used are returned. ``max_windows`` scores
    only the first that many windows (a quick estimate). ``batch_size`` windows run per forward;
    a shorter last window is right-padded and masked, which cannot change causal predictions.

    ``model`` is a Hugging Face causal LM, or any callable ``ids (1, T) -> logits (1, T, V)`` (a
    decode engine's prefill, say), which is scored one window at a time with the same protocol.

    Returns ``{perplexity, nll, n_tokens, n_windows, max_length, stride}`` with nll the mean
    negative log-likelihood per scored token in nats.
    """
    if max_length < 2:
        raise TernlmError(f"max_length must be >= 2, got {max_length}")
    if stride < 1:
        raise TernlmError(f"stride must be >= 1, got {stride}")
    if batch_size < 1:
        raise TernlmError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise TernlmError(f"max_windows must be >= 1, got {max_windows}")
    is_module = isinstance(model, torch.nn.Module)
    if not is_module:
        batch_size = 1  # a logits callable takes one unpadded window
    context = model_context_length(model) if is_module else None
    if context is not None:
        max_length = min(max_length, context)
    stride = min(stride, max_length)

    # verbose=False: a corpus is meant to be longer than the model context, so the tokenizer's
    # "sequence length is longer than the maximum" warning would be noise.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # (seq_len,)
    seq_len = ids.numel()
    if seq_len < 2:
        raise TernlmError(f"text is too short for perplexity: {seq_len} token(s), need at least 2")

    windows = _windows(seq_len, max_length, stride)
    if max_windows is not None:
        windows = windows[:max_windows]

    device = model_device(model) if is_module else torch.device("cpu")
    nll_sum, n_scored = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with (eval_mode(model) if is_module else contextlib.nullcontext()), torch.inference_mode():
        for batch in tqdm(batches, desc="perplexity", disable=not progress):
            width = max(end - begin for begin, end, _ in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (begin, end, n_targets) in enumerate(batch):
                n = end - begin
                input_ids[row, :n] = ids[begin:end]
                attention_mask[row, :n] = 1
                labels[row, n - n_targets : n] = ids[end - n_targets : end]
            if is_module:
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                ).logits  # (B, T, V)
            else:
                logits = model(input_ids)  # (1, T, V)
            # Position t predicts token t+1, so a target at position 0 has no prediction.
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            nll_sum += F.cross_entropy(shift_logits, shift_labels, reduction="sum").item()  # -100 ignored
            n_scored += int((shift_labels != -100).sum())

    nll = nll_sum / n_scored
    if not math.isfinite(nll):
        raise TernlmError(
            "model produced a non-finite loss (NaN/inf logits); the model is numerically broken"
        )
    try:
        ppl = math.exp(nll)
    except OverflowError:  # nll > ~709: finite but astronomically bad
        ppl = math.inf
    return {
        "perplexity": ppl,
        "nll": nll,
        "n_tokens": n_scored,
        "n_windows": len(windows),
        "max_length": max_length,
        "stride": stride,
    }


# ---------------------------------------------------------------------------------------------
# ``ternlm eval``: a model source and a text source in, the number and its protocol out


@dataclass
class EvalConfig:
    """window: tokens per forward pass; stride: tokens between window starts (= window:
    non-overlapping windows, the first token of each unscored); max_windows: score only the first
    N windows (None: the whole text). text_config / split: for hub datasets and local
    ``wiki.{split}.raw`` directories."""

    window: int = 512
    stride: int | None = None  # None: the window (non-overlapping)
    max_windows: int | None = None
    batch_size: int = 1
    text_config: str | None = None
    split: str = "test"

    def __post_init__(self):
        if self.stride is None:
            self.stride = self.window
        if self.window < 2 or self.stride < 1 or self.batch_size < 1:
            raise TernlmError("window >= 2, stride >= 1 and batch_size >= 1 are required")
        if self.stride > self.window:
            raise TernlmError(f"stride ({self.stride}) > window ({self.window}) would skip tokens")
        if self.max_windows is not None and self.max_windows < 1:
            raise TernlmError("max_windows must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model_source, text_source, cfg: EvalConfig | None = None, *, gguf_file: str | None = None,
             json_out: str | Path | None = None, progress: bool = False) -> dict:
    """Perplexity of the model at ``model_source`` (anything ``ternlm.load`` reads) on a text.

    Inputs and the JSON destination are checked before the model loads. Returns the perplexity
    result plus the protocol, the sources and the wall time; ``json_out`` gets the same as JSON.
    """
    from ternlm.data.text import check_source, load_text
    from ternlm.fileio import check_output_file, save_json
    from ternlm.models.loading import load, source_kind

    cfg = cfg or EvalConfig()
    check_source(text_source, "text file")
    if json_out is not None:
        check_output_file(json_out)
    kind = source_kind(model_source, gguf_file)
    text = load_text(text_source, config=cfg.text_config, split=cfg.split)
    model, tok = load(model_source, gguf_file=gguf_file)
    if tok is None:
        raise TernlmError(f"no tokenizer files in {model_source}")
    t0 = time.perf_counter()
    res = perplexity(model, tok, text, max_length=cfg.window, stride=cfg.stride, max_windows=cfg.max_windows,
                     batch_size=cfg.batch_size, progress=progress)
    res.update(seconds=time.perf_counter() - t0, model=str(model_source), model_kind=kind, text=str(text_source),
               protocol=cfg.to_dict())
    if json_out is not None:
        save_json(res, json_out)
    return res
