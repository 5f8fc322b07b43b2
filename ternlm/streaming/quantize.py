"""Streaming absmean quantization: a checkpoint larger than memory, one block at a time.

    from ternlm.streaming import stream_quantize
    stream_quantize("big-model-dir", "out", QuantizeConfig(fmt="base3"), resume=True)

The model skeleton is built on the meta device only to learn the layer names and shapes (the same
target selection as the in-memory path); the weights are read one tensor at a time from the
safetensors shards (``ternlm.streaming.files``), quantized with the canonical quantizer, and each
transformer block is written as its own output shard. Peak memory is about the largest tensor in
float32, its temporaries and one block of packed output, whatever the model's size.

Every tensor equals, byte for byte, what ``ternlm.quantization.quantize`` (load everything, convert,
``save_pretrained``) writes; only the file layout differs (shards + ``model.safetensors.index.json``).

Resuming: shards are written into ``.<out>.partial/`` beside the output (it holds ``INCOMPLETE``
while unfinished) and a progress file lists the finished blocks; a killed run restarted with
``resume=True`` skips them, and the finished directory is swapped in by rename at the end, so the
output is only ever absent, complete, or clearly marked incomplete.
"""

from __future__ import annotations

from pathlib import Path

from ternlm.errors import TernlmError
from ternlm.streaming.job import (INCOMPLETE, PROGRESS_FILE, Job, _convert_unit, layout,  # noqa: F401 (re-exported)
                                  partial_dir, shard_name)


def stream_quantize(source: str | Path, out_dir: str | Path, cfg, *, resume: bool = False,
                    progress: bool = True, check_disk: bool = True, gguf_file: str | None = None) -> Path:
    """Quantize the safetensors model directory ``source`` into ``out_dir`` one block at a time.

    cfg: a ``ternlm.quantization.QuantizeConfig``. ``absmean`` reads one tensor at a time;
    ``pt-bitnet`` goes through ``ternlm.streaming.ptbitnet`` (one block in float32 plus the
    calibration activations). ``resume``: continue a run killed earlier (its ``.<out>.partial``
    directory); without it an existing partial run is an error rather than silently discarded.
    Returns the output path.
    """
    if hasattr(cfg, "resolve"):  # act_bits="auto": the source's training precision, else 8
        cfg = cfg.resolve(source)
    if cfg.method == "pt-bitnet":
        from ternlm.streaming.ptbitnet import stream_ptbitnet

        return stream_ptbitnet(source, out_dir, cfg, resume=resume, progress=progress, check_disk=check_disk,
                               gguf_file=gguf_file)
    if cfg.method != "absmean":
        raise TernlmError(f"streaming quantization does not support --method {cfg.method}")
    job = Job(source, out_dir, cfg, check_disk=check_disk, gguf_file=gguf_file)
    job.start(resume)

    from tqdm.auto import tqdm

    for u in tqdm(job.names, desc="quantize (streaming)", unit="block", disable=not progress):
        if u in job.done:
            continue
        job.write_unit(u, _convert_unit(job.units[u], job.lay, job.reader, cfg))
    return job.finish()
