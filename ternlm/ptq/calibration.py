"""Calibration data and the inputs of the first transformer block.

NOTE on caches: in current transformers a decoder layer receives the model's cache object
(``cache`` / ``past_key_values``) in its keyword arguments. Re-running a layer with captured
arguments would append to that cache and attend over stale keys, silently. The model is run with
``use_cache=False`` and every cache argument is dropped from what is captured.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ternlm.errors import TernlmError

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def calibration_ids(tokenizer, text: str, n_tokens: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """(n_tokens // seq_len, seq_len) token ids: non-overlapping windows of the tokenized text,
    a seeded random choice of them in text order."""
    if seq_len < 2 or n_tokens < seq_len:
        raise TernlmError(f"need seq_len >= 2 and n_tokens >= seq_len, got {n_tokens} and {seq_len}")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    n_seq = n_tokens // seq_len
    need = n_seq * seq_len
    if ids.numel() < need:
        raise TernlmError(f"calibration text is too short: {ids.numel()} tokens, need at least {need} "
                          f"({n_seq} sequences of {seq_len})")
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows.shape[0], generator=g)[:n_seq].sort().values
    return windows[pick].clone()


def block_stack(model: nn.Module, targets: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks that holds the target layers."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and any(t.startswith(name + ".") for t in targets):
            return name, m
    raise TernlmError(f"no transformer block stack found in {type(model).__name__}")


class _Stop(Exception):
    pass


def block_output(out):
    """A decoder layer returns a tensor (current transformers) or a tuple starting with one."""
    return out[0] if isinstance(out, (tuple, list)) else out


def clean_kwargs(kwargs: dict) -> dict:
    kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.LongTensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every sequence (n_seq, seq_len, hidden), and the other
    arguments the model passes to its blocks (position embeddings, mask), captured with the cache
    off. The forward is stopped at block 0, one sequence at a time, so the arguments have batch 1
    and broadcast over any batch of sequences."""
    states, captured = [], {}

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        states.append(hs.detach().float())
        if not captured:
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            captured.update(clean_kwargs(kw))
            captured["_args"] = tuple(args[1:])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in ids:
            try:
                model(input_ids=row[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(states) != ids.shape[0]:
        raise TernlmError("could not capture the inputs of the first transformer block")
    return torch.cat(states, 0), captured


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """block(x) with captured arguments; x (B, T, hidden)."""
    kw = {k: v for k, v in kwargs.items() if k != "_args"}
    return block_output(block(x, *kwargs.get("_args", ()), **kw))


@torch.no_grad()
def run_block_batched(block: nn.Module, x: torch.Tensor, kwargs: dict, batch: int = 4) -> torch.Tensor:
    return torch.cat([run_block(block, x[i:i + batch], kwargs) for i in range(0, x.shape[0], batch)], 0)


@torch.no_grad()
def block_kwargs(model: nn.Module, blocks: nn.ModuleList, ids: torch.LongTensor, first: dict) -> list[dict]:
    """The arguments each block receives. ``first``: block 0's, from ``capture_block_inputs``.

    Models whose layers differ in kind (``config.layer_types``: sliding-window and full attention,
    as in GPT-OSS) give each kind its own mask, so every block's arguments are captured from one
    forward of ``ids[:1]`` in which every block returns its input unchanged: no block weight is
    read, so this also runs while the blocks are still on the meta device. Other models pass every
    block the same arguments; block 0's are reused.
    """
    kinds = getattr(model.config, "layer_types", None)
    if not kinds or len(set(kinds)) < 2:
        return [first] * len(blocks)
    kws: list = [None] * len(blocks)

    def make(i):
        def forward(*args, **kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            kw = clean_kwargs({k: v for k, v in kwargs.items() if k != "hidden_states"})
            kw["_args"] = tuple(args[1:])
            kws[i] = kw
            if i == len(blocks) - 1:
                raise _Stop
            return hs
        return forward

    for i, b in enumerate(blocks):
        b.forward = make(i)
    try:
        try:
            model(input_ids=ids[:1], use_cache=False)
        except _Stop:
            pass
    finally:
        for b in blocks:
            del b.forward
    if any(k is None for k in kws):
        raise TernlmError("could not capture the arguments of every transformer block")
    return kws
