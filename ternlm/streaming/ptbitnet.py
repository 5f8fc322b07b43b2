"""Streaming pt-bitnet: calibrated ternary PTQ of a checkpoint larger than memory, block by block.

    from ternlm.quantization import QuantizeConfig
    from ternlm.streaming import stream_quantize
    stream_quantize("big-model-dir", "out", QuantizeConfig(method="pt-bitnet", calib="wiki.valid.raw"))

The model exists on the meta device. Only the layers in front of the first block (embeddings,
rotary tables) are read, once, to compute the calibration activations entering block 0; then, per
transformer block, in order:

    read the block's weights from the shards (float32)   -> one block in memory
    ternlm.ptq.quantize.quantize_block                    (the same code as the in-memory run)
    pack its linears, write its output shard              -> the block is dropped
    the quantized and full-precision activation streams  -> the next block

so peak memory is one float32 block, its Hessians and the activation streams
(3 x calib_tokens x hidden x 4 bytes), whatever the number of blocks. The output tensors equal the
in-memory ``quantize(..., QuantizeConfig(method="pt-bitnet"))`` bit for bit (tested).

Resuming: after each block the two activation streams and both random generators' states are saved
beside the finished shards (``calib_state_<block>.safetensors``, written before the progress file
names it), so a killed run restarted with ``resume=True`` continues from the last finished block
and ends where an unbroken run ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ternlm.errors import TernlmError
from ternlm.streaming.job import Job, _convert_unit


def _state_name(bi: int) -> str:
    return f"calib_state_{bi:05d}.safetensors"


def _save_state(part: Path, bi: int, x_q: torch.Tensor, x_fp: torch.Tensor, gen: torch.Generator) -> str:
    from safetensors.torch import save_file

    name = _state_name(bi)
    tmp = part / f".{name}.tmp"
    save_file({"x_q": x_q.contiguous(), "x_fp": x_fp.contiguous(), "gen": gen.get_state(),
               "rng": torch.get_rng_state()}, str(tmp))
    os.replace(tmp, part / name)
    return name


def _load_state(path: Path, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        st = load_file(str(path))
        gen.set_state(st["gen"])
        torch.set_rng_state(st["rng"])
        return st["x_q"], st["x_fp"]
    except Exception as e:
        raise TernlmError(f"cannot read the saved calibration state {path}: {type(e).__name__}; "
                          f"remove {path.parent} to start over") from None


def _read_float32(job: Job, keys: list[str], strip: str = "") -> dict[str, torch.Tensor]:
    """Source tensors by model name as the in-memory loader holds them (floats in float32)."""
    out = {}
    for k in keys:
        name = job.reader.name(k)
        if name is None and job.reader.has(k + "_blocks"):  # MXFP4 experts, decoded one expert at a time
            out[k[len(strip):]] = _mxfp4_experts(job, k)
            continue
        if name is None:
            raise TernlmError(f"tensor {k} is not in the source files of {job.src}")
        out[k[len(strip):]] = job.reader.get_as(k, torch.float32)
    return out


def _mxfp4_experts(job: Job, k: str) -> torch.Tensor:
    """A 3-D expert parameter stored as MXFP4 blocks + scales, in the Hugging Face layout, float32."""
    from ternlm.moe.experts import expert_mats, expert_style

    module, _, leaf = k.rpartition(".")
    style = expert_style(job.lay["model"].get_submodule(module))
    mats = torch.stack(list(expert_mats(module, leaf[: -len("_proj")], job.reader, style)))
    return (mats.transpose(1, 2) if style == "gpt_oss" else mats).contiguous()


def _calibration_ids(src: Path, cfg, pcfg, gguf_file: str | None = None):
    from ternlm.data.text import check_source, load_text
    from ternlm.models.sources import load_tokenizer
    from ternlm.ptq import calibration_ids

    check_source(cfg.calib, "calibration text")
    try:
        tokenizer = load_tokenizer(str(src), gguf_file=gguf_file)
    except TernlmError:
        raise TernlmError(f"no tokenizer files in {src}: pt-bitnet needs one to read the calibration text") from None
    text = load_text(cfg.calib, split=cfg.calib_split)
    return calibration_ids(tokenizer, text, pcfg.calib_tokens, pcfg.seq_len, pcfg.seed)


def _block_inputs(job: Job, model, blocks, stack: str, state_keys: list[str], ids: torch.Tensor):
    """The activations entering block 0 (and the arguments blocks get), from the layers in front
    of the blocks alone; those layers are read for this and dropped again."""
    from ternlm.checkpoint import rebuild_nonpersistent_buffers
    from ternlm.ptq.calibration import block_kwargs, capture_block_inputs

    head = model.get_output_embeddings()
    head_names = {f"{n}." for n, m in model.named_modules() if head is not None and m is head}
    front = [k for k in state_keys if not k.startswith(stack + ".") and not k.startswith(tuple(head_names))]
    model.load_state_dict(_read_float32(job, front), strict=False, assign=True)
    rebuild_nonpersistent_buffers(model)
    try:
        x, kw = capture_block_inputs(model.eval(), blocks, ids)
        kws = block_kwargs(model, blocks, ids, kw)
    except TernlmError:
        raise
    except Exception as e:
        raise TernlmError(f"cannot run the layers in front of the first block: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not torch.isfinite(x).all():
        raise TernlmError("non-finite values (NaN/inf) in the activations entering the first transformer block")
    with torch.no_grad():  # drop the front layers again: an embedding can outweigh a block
        for k in front:
            module, _, leaf = k.rpartition(".")
            m = model.get_submodule(module)
            t = getattr(m, leaf)
            if isinstance(t, torch.nn.Parameter):
                m._parameters[leaf] = torch.nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
            elif isinstance(t, torch.Tensor):
                m._buffers[leaf] = torch.empty_like(t, device="meta")
    return x, kws


def stream_ptbitnet(source: str | Path, out_dir: str | Path, cfg, *, resume: bool = False, progress: bool = True,
                    check_disk: bool = True, gguf_file: str | None = None) -> Path:
    """pt-bitnet of the safetensors model directory ``source`` into ``out_dir``, one block in memory.

    cfg: a ``QuantizeConfig`` with ``method='pt-bitnet'``. Same output tensors as the in-memory
    path, written as one shard per block with an index; see the module docstring for resuming.
    """
    from tqdm.auto import tqdm

    from ternlm.checkpoint import TORCH_DTYPES, rebuild_nonpersistent_buffers
    from ternlm.ptq.calibration import block_stack
    from ternlm.moe.experts import expert_modules
    from ternlm.ptq.experts import pack_experts
    from ternlm.ptq.quantize import block_targets, expert_counts, pack_layer, ptq_log, quantize_block
    from ternlm.ptq.rounding import n_groups
    from ternlm.ptq.config import PTQ_LOG

    t0 = time.perf_counter()
    pcfg = cfg.ptbitnet()
    job = Job(source, out_dir, cfg, check_disk=check_disk, gguf_file=gguf_file)  # every header checked first
    ids = _calibration_ids(job.src, cfg, pcfg, job.gguf_file)
    lay = job.lay
    model, targets = lay["model"], lay["targets"]
    stack, blocks = block_stack(model, targets)
    state_keys = list(model.state_dict())
    job.start(resume, extra=hashlib.sha256(ids.numpy().tobytes()).digest())

    torch.manual_seed(pcfg.seed)
    gen = torch.Generator().manual_seed(pcfg.seed)
    x_q, kws = _block_inputs(job, model, blocks, stack, state_keys, ids)
    x_fp = x_q.clone()
    state = job.state or {"records": [], "calib_state": None}
    if state.get("calib_state"):
        x_q, x_fp = _load_state(job.part / state["calib_state"], gen)

    want = TORCH_DTYPES[cfg.float_dtype]
    n_w = n_s = 0
    bar = tqdm(list(enumerate(blocks)), desc="pt-bitnet (streaming)", unit="block", disable=not progress)
    for bi, _ in bar:
        prefix = f"{stack}.{bi}"
        names = block_targets(targets, prefix + ".")
        if prefix not in job.units:
            raise TernlmError(f"internal: block {prefix} has no output unit")
        if prefix in job.done:
            blocks[bi] = torch.nn.Identity()
            continue
        block = blocks[bi]
        block.load_state_dict(_read_float32(job, [k for k in state_keys if k.startswith(prefix + ".")],
                                            strip=prefix + "."), strict=True, assign=True)
        rebuild_nonpersistent_buffers(model, block)
        rec, x_q, x_fp = quantize_block(block, bi, names, x_q, x_fp, kws[bi], pcfg, gen, prefix)
        for n in names:
            pack_layer(block, n, pcfg)
        experts = expert_modules(block)
        for n in experts:
            pack_experts(block, n, pcfg)
        keep = tuple(f"{n}." for n in names + experts)  # packed codes, scales, biases stay as they are
        tensors = {f"{prefix}.{k}": (v.to(want) if v.is_floating_point() and not k.startswith(keep) else v)
                   .detach().contiguous() for k, v in block.state_dict().items()}
        blocks[bi] = torch.nn.Identity()
        del block
        old = state.get("calib_state")
        records = state["records"] + ([rec] if rec is not None else [])
        state = {"records": records, "calib_state": _save_state(job.part, bi, x_q, x_fp, gen)}
        job.write_unit(prefix, tensors, state=json.loads(json.dumps(state, default=str)))
        if old:
            (job.part / old).unlink(missing_ok=True)
        if rec is not None:
            bar.set_postfix(rel_loss=f"{rec['rel_loss']:.3g}")
    del x_q, x_fp
    for u in job.names:  # embeddings, final norm, head: unchanged by pt-bitnet, cast as the in-memory save does
        if u not in job.done:
            job.write_unit(u, _convert_unit(job.units[u], lay, job.reader, cfg))
    for t in targets:
        out_f, in_f = lay["packed"].get_submodule(t).out_features, lay["packed"].get_submodule(t).in_features
        n_w += in_f * out_f
        n_s += out_f * n_groups(in_f, pcfg.group_size)
    for name in lay["experts"]:
        w, s = expert_counts(lay["packed"].get_submodule(name), pcfg.group_size)
        n_w, n_s = n_w + w, n_s + s
    log = ptq_log(t0, len(targets), n_w, n_s, True, state["records"], pcfg)
    log.update(source=str(source), calib=str(cfg.calib), quantize_config=cfg.to_dict(), streaming=True)
    for f in job.part.glob("calib_state_*.safetensors"):
        f.unlink()
    return job.finish({PTQ_LOG: json.dumps(log, indent=2, default=str) + "\n"})
