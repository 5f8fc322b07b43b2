"""What a model costs to run and store: latency, weight footprint per format, real bytes, RSS."""

from __future__ import annotations

import math
import statistics
import sys
from typing import Sequence

import psutil
import torch
from transformers.pytorch_utils import Conv1D

from ternlm.errors import TernlmError
from ternlm.eval.classification import eval_mode, model_device

LOG2_3 = math.log2(3)


def latency_per_message(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int = 128,
    warmup: int = 1,
    repeats: int = 3,
) -> dict:
    """Wall-clock time of the model's forward pass over ``texts`` in batches of ``batch_size``.

    Texts are tokenized (right-padded per batch, truncated to ``max_length``) before timing, so
    only the forward passes are measured. ``warmup`` untimed passes over the first batch come
    first (allocator, lazy kernel loads); then ``repeats`` timed passes over all batches, and the
    median pass is reported as ms per message (pass / len(texts)) and ms per batch
    (pass / n_batches; a shorter last batch is included as it is).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise TernlmError(
            f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}"
        )
    texts = list(texts)
    if not texts:
        raise TernlmError("no texts to time")
    if tokenizer.pad_token_id is None:
        raise TernlmError("tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    device = model_device(model)
    from ternlm.eval.classification import encode_batch

    batches = [encode_batch(tokenizer, texts[i : i + batch_size], max_length, device)
               for i in range(0, len(texts), batch_size)]

    def sync():
        # CUDA launches are asynchronous; without a sync the clock stops before the work does.
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    from ternlm.timing import time_calls

    def one_pass():
        for batch in batches:
            model(**batch)

    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(**batches[0])
        times = time_calls(one_pass, warmup=0, min_calls=repeats, sync=sync)
    total_ms = statistics.median(times) * 1e3
    return {
        "ms_per_message": total_ms / len(texts),
        "ms_per_batch": total_ms / len(batches),
        "batch_size": batch_size,
        "n_batches": len(batches),
        "n_messages": len(texts),
        "repeats": repeats,
    }


def _out_features(name: str, module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.weight.shape[0]  # weight (out, in)
    if isinstance(module, Conv1D):
        return module.weight.shape[1]  # GPT-2 Conv1D weight is (in, out)
    raise TernlmError(
        f"{name!r} is a {type(module).__name__}, not nn.Linear or Conv1D; cannot size it as quantized"
    )


def weight_footprint(model: torch.nn.Module, quantized_names: Sequence[str]) -> dict:
    """Bytes the model's parameters would take in each storage format, from shapes alone.

    ``quantized_names`` name the nn.Linear / Conv1D modules whose weights get quantized. Works on
    a meta-device model (no data is read).

    Assumptions:
    - Only parameters count (buffers such as attention masks are excluded); each distinct
      Parameter once, so tied weights (GPT-2's lm_head and wte) count once. If a quantized
      layer's weight is tied to another module, the shared tensor counts once, as quantized.
    - "quantized" covers the quantized weight tensors only (codes + scales); "rest" is every
      other parameter, including the biases of quantized layers.
    - fp32 / fp16: every parameter at 4 / 2 bytes.
    - int8: 1 byte per quantized weight + one fp32 scale per output row; rest fp32.
    - ternary_2bit: 2 bits per quantized weight, each tensor padded to whole bytes, + one fp32
      scale per tensor; rest fp32.
    - ternary_log2_3: log2(3) ~ 1.585 bits per quantized weight (the information-theoretic
      bound; real base-3 packing of 5 trits per byte needs 1.6), + one fp32 scale per tensor;
      rest fp32. Not rounded to whole bytes, so these values are floats.
    - No file-format headers, metadata or alignment padding.

    Returns ``{n_params_total, n_params_quantized, n_quantized_tensors, formats}`` where
    ``formats[fmt] = {total_bytes, quantized_bytes, rest_bytes}``.
    """
    quantized = {}  # id(weight) -> weight, deduplicated for tied weights
    out_rows = {}
    for name in dict.fromkeys(quantized_names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise TernlmError(f"model has no module named {name!r}") from None
        rows = _out_features(name, module)
        quantized[id(module.weight)] = module.weight
        out_rows[id(module.weight)] = rows

    n_total = sum(p.numel() for p in model.parameters())
    n_quant = sum(w.numel() for w in quantized.values())
    n_rest = n_total - n_quant
    n_tensors = len(quantized)
    n_rows = sum(out_rows.values())

    quantized_bytes = {
        "fp32": 4 * n_quant,
        "fp16": 2 * n_quant,
        "int8": n_quant + 4 * n_rows,
        "ternary_2bit": sum(math.ceil(w.numel() * 2 / 8) for w in quantized.values()) + 4 * n_tensors,
        "ternary_log2_3": n_quant * LOG2_3 / 8 + 4 * n_tensors,
    }
    rest_bytes = {fmt: (2 if fmt == "fp16" else 4) * n_rest for fmt in quantized_bytes}
    return {
        "n_params_total": n_total,
        "n_params_quantized": n_quant,
        "n_quantized_tensors": n_tensors,
        "formats": {
            fmt: {
                "total_bytes": quantized_bytes[fmt] + rest_bytes[fmt],
                "quantized_bytes": quantized_bytes[fmt],
                "rest_bytes": rest_bytes[fmt],
            }
            for fmt in quantized_bytes
        },
    }


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are actually stored.

    Counts whatever dtypes the modules hold (an int8 or packed-uint8 buffer is 1 byte per
    element). Tensors sharing storage (tied weights, views) count once, at the size of the
    underlying storage. Meta tensors have no storage and count at numel * element size.
    """
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.data_ptr() != 0 and key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB: the one peak-RSS measure.

    Linux: ``VmHWM`` from /proc/self/status (the kernel's high-water mark of this process image;
    unlike ``ru_maxrss`` it does not inherit the peak of a parent that forked it). Elsewhere:
    ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # Unix only; imported here so the module still imports elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark to its current RSS, so that ``peak_rss_mb``
    measures the peak of what runs next (per-stage peaks). Linux only (``/proc/self/clear_refs``);
    returns False where the mark cannot be reset (then ``peak_rss_mb`` stays the process peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS before measuring RSS (glibc keeps them otherwise, so
    RSS would not show that a model shrank). For callers that measure memory, and between the units
    of a streaming job; process-wide. ``collect=False`` skips the garbage collection (the caller
    freed its tensors by reference count; a full collection of a large heap costs tens of ms)."""
    import gc

    if collect:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def current_rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    return psutil.Process().memory_info().rss / 2**20
