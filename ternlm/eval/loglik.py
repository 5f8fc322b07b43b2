"""Log-likelihood of continuations given contexts: the one scorer behind ``ternlm eval --tasks`` and
ternlm's lm-eval-harness model.

A request is (context, continuation). It is tokenized the way lm-eval-harness tokenizes it
(``encode_pair``): trailing spaces of the context move to the continuation, the context is
encoded alone, and the continuation is what encoding the whole adds after the context's tokens;
no special tokens are added, and an empty context is the model's prefix token (BOS, else EOS).
The model reads ``context + continuation[:-1]`` and the result is the summed log-probability of
the continuation's tokens plus whether each of them is the greedy (argmax) choice.

Requests that share a context (the choices of a multiple-choice question) are scored in one
sequence: the context once, then every continuation after it, each attending to the context and
to itself only (a 4-D attention mask) at the positions it would have on its own. The result is
the same as scoring each request alone (checked on the first batch of every run against the plain
forward pass; a model for which it differs by more than the plain pass's own noise, or that
refuses the mask, is scored request by request). The noise is measured, not assumed: the plain
pass is repeated with a few tokens appended, which changes nothing a causal model computes for the
request but the shapes its kernels see. Float models move by ~1e-5 nats; W1.58A8 models, whose
per-token int8 roundings flip on last-bit changes, by up to about half a nat. Sequences are batched longest first up to ``batch_tokens`` tokens a batch, and the LM
head runs only at the positions that predict a continuation token.

    scorer = LoglikScorer(model, tokenizer)
    scorer.loglikelihood([("Question: 2+2=\\nAnswer:", " 4"), ("Question: 2+2=\\nAnswer:", " 5")])
    # -> [(-1.3, True), (-4.2, False)]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ternlm.errors import TernlmError

HEAD_CHUNK = 512  # positions per LM-head call: (512, vocab) logits at a time
PROBE_TOL = 1e-3  # nats: shared-context and plain scores of the probe must agree this closely


@dataclass
class _Row:
    """One model input: a context then the continuations that share it (all but their last token)."""

    tokens: list[int]
    positions: list[int]
    segments: list[tuple[int, int]]  # (start, length) in ``tokens`` of each continuation's inputs
    requests: list[int]  # request index per segment
    targets: list[list[int]]  # continuation tokens per segment
    ctx_len: int


@dataclass
class ScoreStats:
    """What the scorer did: tokens through the model, requests, batches, seconds, the mode used."""

    tokens: int = 0
    requests: int = 0
    batches: int = 0
    seconds: float = 0.0
    mode: str = "shared"
    notes: list = field(default_factory=list)


def model_max_length(model, default: int = 2048) -> int:
    from ternlm.eval.perplexity import model_context_length

    return model_context_length(model) or default


class LoglikScorer:
    """Scores (context, continuation) requests with a Hugging Face causal LM (float, int8 or packed
    ternary layers alike). ``max_length``: tokens per input (default: the model's context);
    ``batch_tokens``: padded tokens per forward pass; ``share_context``: score requests with the
    same context in one sequence (checked against the plain pass, see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int | None = None, batch_tokens: int = 2048,
                 share_context: bool = True):
        if batch_tokens < 1:
            raise TernlmError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model_max_length(model))
        self.batch_tokens = batch_tokens
        self.share_context = share_context
        self.stats = ScoreStats(mode="shared" if share_context else "plain")
        self._checked = not share_context
        self._head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if self._head is None or not isinstance(self._base, torch.nn.Module) or self._base is model:
            self._base = None

    # -- tokenization (lm-eval-harness's rules) -------------------------------------------------

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        for t in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
            if t is not None:
                return int(t)
        raise TernlmError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":  # the prefix token stands for the context, unless the continuation starts with it
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring ---------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]], *, progress: bool = False, desc: str | None = None,
                      on_batch: Callable[[int, float], None] | None = None) -> list[tuple[float, bool]]:
        """(log-likelihood in nats, is greedy) per (context, continuation) request."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, progress=progress, desc=desc, on_batch=on_batch)

    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, progress: bool = False,
                             desc: str | None = None,
                             on_batch: Callable[[int, float], None] | None = None) -> list[tuple[float, bool]]:
        """The same on token ids: (context ids, continuation ids) per request."""
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 0:
                raise TernlmError(f"request {i}: the continuation has no tokens")
            if len(ctx) == 0:
                raise TernlmError(f"request {i}: empty context (use the prefix token)")
            if len(cont) > self.max_length:
                raise TernlmError(f"request {i}: continuation of {len(cont)} tokens is longer than the model's "
                                  f"{self.max_length}-token context")
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        if not pairs:
            return []
        rows = self._rows(pairs, shared=self.stats.mode == "shared")
        if not self._checked:
            # the probe row with the most continuations that feed the model tokens (the second and
            # later ones sit at positions that only position_ids put right), the shortest such
            self._probe(max(rows, key=lambda r: (sum(n > 0 for _, n in r.segments), -len(r.tokens))), pairs)
            if self.stats.mode != "shared":
                rows = self._rows(pairs, shared=False)
        rows.sort(key=lambda r: -len(r.tokens))
        batches, cur, width = [], [], 0
        for r in rows:
            w = max(width, len(r.tokens))
            if cur and w * (len(cur) + 1) > self.batch_tokens:
                batches.append(cur)
                cur, w = [], len(r.tokens)
            cur.append(r)
            width = w
        if cur:
            batches.append(cur)
        total = sum(len(r.tokens) for r in rows)
        bar = tqdm(total=total, desc=desc or "scoring", unit="tok", disable=not progress, leave=False)
        try:
            for batch in batches:
                t0 = time.perf_counter()
                for r, (ll, greedy) in zip(batch, self._run(batch)):
                    for req, v, g in zip(r.requests, ll, greedy):
                        results[req] = (v, g)
                dt = time.perf_counter() - t0
                n = sum(len(r.tokens) for r in batch)
                self.stats.tokens += n
                self.stats.batches += 1
                self.stats.seconds += dt
                bar.update(n)
                if on_batch is not None:
                    on_batch(n, dt)
        finally:
            bar.close()
        self.stats.requests += len(pairs)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, texts: Sequence[str], *, progress: bool = False) -> list[float]:
        """Log-likelihood of whole texts: every token scored once, in disjoint windows of
        ``max_length`` (the first after the prefix token), as lm-eval-harness's rolling scoring."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for p in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                pairs.append(p)
                owner.append(i)
        out = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.loglikelihood_tokens(pairs, progress=progress, desc="rolling")):
            out[i] += ll
        return out

    # -- internals -------------------------------------------------------------------------------

    def _rows(self, pairs, shared: bool) -> list[_Row]:
        groups: dict = {}
        for i, (ctx, cont) in enumerate(pairs):
            key = tuple(ctx) if shared else i
            groups.setdefault(key, (list(ctx), []))[1].append((i, list(cont)))
        rows = []
        for ctx, members in groups.values():
            longest = max(len(c) for _, c in members)
            keep = self.max_length - longest + 1  # context tokens that fit beside the longest continuation
            ctx = ctx[-keep:]
            tokens, positions = list(ctx), list(range(len(ctx)))
            segments, reqs, targets = [], [], []
            for i, cont in members:
                start = len(tokens)
                inputs = cont[:-1]
                tokens += inputs
                positions += range(len(ctx), len(ctx) + len(inputs))
                segments.append((start, len(inputs)))
                reqs.append(i)
                targets.append(cont)
            rows.append(_Row(tokens, positions, segments, reqs, targets, len(ctx)))
        return rows

    def _mask(self, batch: list[_Row], width: int) -> torch.Tensor:
        """(B, 1, T, T) bool, True where a query may attend: the context causally, each continuation
        to the context and causally to itself; padding to itself only (no empty rows)."""
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        mask = torch.zeros(len(batch), 1, width, width, dtype=torch.bool)
        for b, r in enumerate(batch):
            L = r.ctx_len
            mask[b, 0, :L, :L] = causal[:L, :L]
            for start, n in r.segments:
                mask[b, 0, start:start + n, :L] = True
                mask[b, 0, start:start + n, start:start + n] = causal[:n, :n]
            pad = torch.arange(len(r.tokens), width)
            mask[b, 0, pad, pad] = True
        return mask

    def _forward_hidden(self, ids, mask, pos):
        """Final hidden states (B, T, C) and the head that maps them to logits, or full logits."""
        if self._base is not None:
            out = self._base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            return out[0], self._head
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        return logits, None

    @torch.inference_mode()
    def _run(self, batch: list[_Row]) -> list[tuple[list[float], list[bool]]]:
        from ternlm.eval.classification import model_device

        device = model_device(self.model)
        width = max(len(r.tokens) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        pos = torch.zeros(len(batch), width, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r.tokens)] = torch.tensor(r.tokens)
            pos[b, : len(r.tokens)] = torch.tensor(r.positions)
        if self.stats.mode == "shared":
            mask = self._mask(batch, width)
        else:  # one request per row: a plain padding mask
            mask = (torch.arange(width)[None] < torch.tensor([len(r.tokens) for r in batch])[:, None]).long()
        hidden, head = self._forward_hidden(ids.to(device), mask.to(device), pos.to(device))

        # the positions whose output predicts a continuation token, and those tokens
        where_b, where_t, target = [], [], []
        for b, r in enumerate(batch):
            for (start, n), cont in zip(r.segments, r.targets):
                for j, tok in enumerate(cont):
                    where_b.append(b)
                    where_t.append(r.ctx_len - 1 if j == 0 else start + j - 1)
                    target.append(tok)
        wb, wt = torch.tensor(where_b), torch.tensor(where_t)
        tgt = torch.tensor(target)
        logp_t = torch.empty(len(target))
        greedy_t = torch.empty(len(target), dtype=torch.bool)
        for s in range(0, len(target), HEAD_CHUNK):
            sl = slice(s, s + HEAD_CHUNK)
            h = hidden[wb[sl].to(hidden.device), wt[sl].to(hidden.device)]
            logits = (head(h) if head is not None else h).float().cpu()
            logp = F.log_softmax(logits, dim=-1)
            logp_t[sl] = logp.gather(1, tgt[sl, None])[:, 0]
            greedy_t[sl] = logits.argmax(-1) == tgt[sl]
        if not torch.isfinite(logp_t).all():
            raise TernlmError("the model produced non-finite log-probabilities (NaN/inf logits); it is numerically "
                              "broken")

        out, k = [], 0
        for r in batch:
            lls, gs = [], []
            for cont in r.targets:
                n = len(cont)
                lls.append(float(logp_t[k:k + n].double().sum()))
                gs.append(bool(greedy_t[k:k + n].all()))
                k += n
            out.append((lls, gs))
        return out

    @torch.inference_mode()
    def _plain(self, ctx: list[int], cont: list[int], extra: int = 0) -> float:
        """One request through the model's own forward (no mask, no head shortcut): the reference.
        ``extra`` more tokens after it (the continuation repeated) change nothing a causal model
        computes for the request, only the shapes its kernels see (see ``_noise``)."""
        from ternlm.eval.classification import model_device

        seq = (ctx + cont)[:-1]
        n = len(seq)
        seq = seq + (cont * (extra // len(cont) + 1))[:extra]
        ids = torch.tensor([seq], device=model_device(self.model))
        logits = self.model(input_ids=ids).logits[0, n - len(cont):n].float().cpu()
        return float(F.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())

    def _noise(self, ctx: list[int], cont: list[int], want: float) -> float:
        """How far the plain pass moves by the input's length alone (nats). Float models move by
        rounding only (~1e-5); models that quantize activations per token (W1.58A8) can move by a
        large fraction of a nat, because a last-bit change in attention (whose kernels block the
        sequence by its length) flips an int8 rounding, and 30 layers amplify it. The shared pass
        differs from the plain one in the same way and is no less right within that noise."""
        room = self.max_length - len(ctx) - len(cont) + 1
        return max((abs(self._plain(ctx, cont, k) - want) for k in (16, 64) if k <= room), default=0.0)

    def _probe(self, row: _Row, pairs) -> None:
        """Check the shared-context pass against the plain pass on one row; fall back if they differ
        by more than the plain pass's own numerical noise (``_noise``) allows."""
        self._checked = True
        try:
            shared = self._run([row])[0][0]
        except Exception as e:  # a model that refuses 4-D masks or position ids
            self._fall_back(f"the model refused the shared-context pass ({type(e).__name__})")
            return
        ctx = row.tokens[: row.ctx_len]
        for req, got in zip(row.requests, shared):
            cont = list(pairs[req][1])
            want = self._plain(ctx, cont)
            if math.isclose(got, want, abs_tol=PROBE_TOL, rel_tol=1e-4):
                continue
            noise = self._noise(ctx, cont, want)
            if abs(got - want) <= PROBE_TOL + 2 * noise:
                self.stats.notes.append(f"shared-context and plain scores differ by {abs(got - want):.3f} nats, within "
                                        f"the plain pass's own {noise:.3f} from the input's length alone")
                continue
            self._fall_back(f"shared-context scores differ from the plain pass ({got:.4f} vs {want:.4f}; the "
                            f"input's length alone moves it by {noise:.4f})")
            return

    def _fall_back(self, why: str) -> None:
        self.stats.mode = "plain"
        self.stats.notes.append(why + "; scoring each request on its own")
        if self._base is not None:  # the head shortcut is part of what was checked: drop it too
            self._base = None


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that score every token of ``tokens`` once: the first
    window predicts up to ``max_length`` tokens after ``prefix``; each later one predicts the next
    ``max_length`` tokens with the tokens before them as context, so each window's input is at most
    ``max_length`` tokens."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        ctx_start = max(0, end - max_length - 1)
        # input = tokens[ctx_start:end-1] (max_length tokens at most); the last n tokens are predicted
        out.append((tokens[ctx_start:done], tokens[done:end]))
        done = end
    return out
