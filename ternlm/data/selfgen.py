"""Data-free recovery text: sequences sampled from the full-precision teacher itself (LLM-QAT).

Each sequence starts from a token drawn uniformly from the vocabulary (special tokens left out),
continues with ``greedy`` greedy tokens, then samples from the teacher's full softmax at
``temperature`` until it is ``length`` tokens long. Sequence ``i`` draws its random numbers from a
generator seeded by (seed, i), so the corpus is a pure function of (teacher, seed, settings) and a
longer corpus begins with the shorter one: asking for more tokens later extends the cache instead
of redoing it.

The corpus is cached as token shards (``ternlm.data.shards``: ``train_*.bin`` + ``meta.json``, what
``ternlm prepare-data`` writes) in a directory, written atomically after every batch of
sequences, so a killed generation resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ternlm.errors import TernlmError

META = "selfgen.json"


@dataclass
class SelfGenConfig:
    """tokens: corpus size; length: tokens per sequence; greedy: greedy tokens after the random
    first one; temperature: sampling temperature after them; batch: sequences generated together."""

    tokens: int = 200_000
    length: int = 256
    greedy: int = 3
    temperature: float = 1.0
    batch: int = 16
    seed: int = 0

    def __post_init__(self):
        for name, low in (("tokens", 1), ("length", 2), ("greedy", 0), ("batch", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise TernlmError(f"self-generation {name} must be an integer >= {low}, got {v!r}")
        if not self.temperature > 0:
            raise TernlmError(f"self-generation temperature must be > 0, got {self.temperature!r}")

    @property
    def n_sequences(self) -> int:
        return -(-self.tokens // self.length)

    def key(self) -> dict:
        """What the corpus depends on (tokens aside: a longer corpus extends a shorter one)."""
        d = asdict(self)
        d.pop("tokens")
        d.pop("batch")
        return d


def _first_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ok = torch.tensor([i for i in range(vocab_size) if i not in special])
    if ok.numel() == 0:
        raise TernlmError("the vocabulary has no ordinary tokens to start sequences from")
    return ok


@torch.inference_mode()
def generate_sequences(model, tokenizer, cfg: SelfGenConfig, start: int, count: int) -> np.ndarray:
    """Sequences ``start .. start+count-1`` of the corpus, (count, length) int64."""
    vocab = model.config.vocab_size
    firsts = _first_tokens(tokenizer, vocab)
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + start + i) for i in range(count)]
    ids = torch.empty(count, cfg.length, dtype=torch.long)
    for i, g in enumerate(gens):
        ids[i, 0] = firsts[torch.randint(0, firsts.numel(), (1,), generator=g)]
    import inspect

    # transformers renamed past_key_values to cache (5.x); support both ends of the pinned range
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    for t in range(1, cfg.length):
        inp = ids[:, :t] if past is None else ids[:, t - 1:t]
        out = model(input_ids=inp, use_cache=True, **({name: past} if past is not None else {}))
        past = getattr(out, "cache", None) or out.past_key_values
        logits = out.logits[:, -1].float()
        if t <= cfg.greedy:
            ids[:, t] = logits.argmax(-1)
            continue
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        for i, g in enumerate(gens):
            ids[i, t] = torch.multinomial(probs[i], 1, generator=g)
    return ids.numpy()


SEQS_PER_SHARD = 64


def self_generate(model, tokenizer, cfg: SelfGenConfig, out_dir: str | Path, *, teacher: str = "",
                  progress: bool = True) -> Path:
    """Make (or extend, or reuse) the self-generated corpus in ``out_dir``; returns the directory.

    ``teacher`` names the model in the cache's record: a cache made by another teacher or with
    other settings is refused, not mixed. Shard k holds sequences [64k, 64k + 64)."""
    from tqdm.auto import tqdm

    from ternlm.data.shards import META_FILE, read_shard, write_shard
    from ternlm.fileio import atomic_write_text

    d = Path(out_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    rec_path = d / META
    want = {"teacher": teacher, **cfg.key()}
    done = 0
    if rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError) as e:
            raise TernlmError(f"cannot read {rec_path}: {e}") from None
        if rec.get("key") != want:
            raise TernlmError(f"{d} holds a self-generated corpus made with other settings ({rec.get('key')}); "
                              f"use another directory or remove it")
        done = int(rec.get("sequences", 0))
    need = cfg.n_sequences
    vocab = model.config.vocab_size
    # the partial last shard's sequences, kept to rewrite it whole as it grows
    k0 = done // SEQS_PER_SHARD
    tail = []
    if done % SEQS_PER_SHARD:
        f = d / f"train_{k0:06d}.bin"
        if not f.is_file():
            raise TernlmError(f"{f} is missing from the self-generated corpus in {d}; remove the directory")
        tail = list(np.asarray(read_shard(f), dtype=np.int64).reshape(-1, cfg.length))
    bar = tqdm(total=need * cfg.length, initial=min(done, need) * cfg.length, desc="self-generate", unit="tok",
               disable=not progress, dynamic_ncols=True)
    while done < need:
        n = min(cfg.batch, need - done, SEQS_PER_SHARD - len(tail))
        tail += list(generate_sequences(model, tokenizer, cfg, done, n))
        done += n
        write_shard(d / f"train_{(done - 1) // SEQS_PER_SHARD:06d}.bin", np.concatenate(tail), vocab)
        if len(tail) == SEQS_PER_SHARD:
            tail = []
        atomic_write_text(rec_path, json.dumps({"key": want, "sequences": done, "length": cfg.length}, indent=2))
        bar.update(n * cfg.length)
    bar.close()
    eot = getattr(tokenizer, "eos_token_id", None)
    meta = {"tokenizer": teacher, "vocab_size": vocab, "eot_token_id": int(eot) if eot is not None else 0,
            "train_tokens": done * cfg.length, "val_tokens": 0, "self_generated": want}
    atomic_write_text(d / META_FILE, json.dumps(meta, indent=2))
    return d


def corpus_tokens(d: str | Path, n_tokens: int | None = None) -> np.ndarray:
    """The first ``n_tokens`` tokens (all when None) of a self-generated corpus, sequence after sequence."""
    from ternlm.data.shards import read_shard

    d = Path(d)
    files = sorted(d.glob("train_*.bin"))
    if not files:
        raise TernlmError(f"no self-generated sequences in {d}")
    parts, total = [], 0
    for f in files:
        a = np.asarray(read_shard(f), dtype=np.int64)
        parts.append(a)
        total += a.size
        if n_tokens is not None and total >= n_tokens:
            break
    out = np.concatenate(parts)
    return out if n_tokens is None else out[:n_tokens]
