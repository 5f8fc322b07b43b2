"""Continuous batching: requests join and leave the running batch at token boundaries.

One thread owns the batch engine. Each turn it admits waiting requests into free slots, prefills at
most ``chunk`` prompt tokens of one request (so a long prompt delays the others' next token by one
chunk, not by the whole prompt), then runs one decode step for every slot that is generating, samples
each slot's next token, and hands it to the request's consumer. A request ends at its token budget,
an end-of-sequence token, a stop string, a cancel (the client went away) or its deadline; its slot is
free for the next turn.

Consumers (the HTTP handlers, on the event loop) get ``Event``s through a callback the scheduler calls
from its thread (``asyncio``'s ``call_soon_threadsafe`` in the server).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ternlm.errors import TernlmError


@dataclass
class Request:
    """One generation: prompt token ids, sampling settings, and where its events go."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple = ()
    deadline: float | None = None  # time.monotonic() after which it ends with an error
    emit: Callable[["Event"], None] = lambda ev: None
    ignore_eos: bool = False  # generate max_tokens even past end-of-text (llama-server's and vLLM's name)
    # filled in by the scheduler
    tokens: list = field(default_factory=list)
    text: str = ""   # the text so far (after stop-string handling)
    sent: int = 0    # characters of it already emitted
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None


@dataclass
class Event:
    """``kind``: "token" (``text`` is the new text, after stop-string handling), "done" (``finish`` is
    "stop" or "length"), or "error" (``message``)."""

    kind: str
    text: str = ""
    finish: str | None = None
    message: str = ""
    request: Request | None = None


class QueueFull(TernlmError):
    """More waiting requests than the queue holds."""


class Scheduler:
    """Runs ``engine`` (a ``BatchEngine``) for many requests; ``decode(tokens) -> str`` detokenizes;
    ``eos`` ends a sequence; ``queue``: how many requests may wait for a slot."""

    def __init__(self, engine, decode: Callable[[list], str], eos: int | None, *, queue: int = 64,
                 chunk: int = 128):
        from ternlm.runtime.engine import make_sampler

        self.engine, self.decode, self.eos = engine, decode, eos
        self.queue_limit, self.chunk = queue, chunk
        self.make_sampler = make_sampler
        self.waiting: collections.deque = collections.deque()
        self.slots: list = [None] * engine.slots  # per slot: [request, sampler, prompt position, next token]
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ternlm-scheduler", daemon=True)
        self.stats = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=256)  # (time, generated tokens) per step

    # -- the consumer side ------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.stopping:
                raise TernlmError("the server is shutting down")
            if len(self.waiting) >= self.queue_limit and all(s is not None for s in self.slots):
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot (--queue {self.queue_limit})")
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(req.ids)
            self.cv.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: the request's slot is freed at the next token boundary."""
        with self.cv:
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
            self.cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish: running requests end with an error, waiting ones too; the thread is joined."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        pts = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if len(pts) < 2:
            return 0.0
        return sum(n for _, n in pts[1:]) / max(pts[-1][0] - pts[0][0], 1e-9)

    # -- the engine side --------------------------------------------------------------------------

    def _run(self) -> None:
        e = self.engine
        with e.e.decoding():  # kernels keep their threads; torch's small ops stay single-threaded
            while True:
                with self.cv:
                    while not self.stopping and not self.waiting and self.busy_slots == 0:
                        self.cv.wait()
                    if self.stopping:
                        break
                    self._admit()
                try:
                    self._turn()
                except Exception as ex:  # a broken model: every running request learns why
                    msg = str(ex).splitlines()[0][:300] if str(ex) else type(ex).__name__
                    for i, s in enumerate(self.slots):
                        if s is not None:
                            self._finish(i, error=f"{type(ex).__name__}: {msg}")
        for i, s in enumerate(self.slots):
            if s is not None:
                self._finish(i, error="the server is shutting down")
        while self.waiting:
            req = self.waiting.popleft()
            req.emit(Event("error", message="the server is shutting down", request=req))

    def _admit(self) -> None:
        for i in range(len(self.slots)):
            if self.slots[i] is None and self.waiting:
                req = self.waiting.popleft()
                self.engine.reset(i)
                sampler = self.make_sampler(req.temperature, req.top_k, req.top_p, req.seed)
                self.slots[i] = [req, sampler, 0, None]

    def _turn(self) -> None:
        now = time.monotonic()
        for i, s in enumerate(self.slots):  # cancelled or past the deadline: free at this boundary
            if s is None:
                continue
            if s[0].cancelled:
                self._finish(i, quiet=True)
            elif s[0].deadline is not None and now > s[0].deadline:
                self._finish(i, error="the request ran past the server's --timeout")
        # one chunk of one prompt (the oldest still prefilling)
        pre = [i for i, s in enumerate(self.slots) if s is not None and s[3] is None]
        if pre:
            i = min(pre, key=lambda j: self.slots[j][0].submitted)
            req, sampler, p, _ = self.slots[i]
            chunk = req.ids[p:p + self.chunk]
            logits = self.engine.prefill(i, chunk)
            self.slots[i][2] = p + len(chunk)
            if self.slots[i][2] >= len(req.ids):  # prompt done: its first token
                self._take(i, int(sampler(logits)))
        # one decode step for every slot that is generating
        gen = [i for i, s in enumerate(self.slots) if s is not None and s[3] is not None]
        if gen:
            logits = self.engine.decode(gen, [self.slots[i][3] for i in gen])
            for j, i in enumerate(gen):
                if self.slots[i] is not None:
                    self._take(i, int(self.slots[i][1](logits[j])))
            self.recent.append((time.monotonic(), len(gen)))

    def _take(self, i: int, tok: int) -> None:
        """Slot i produced ``tok``: emit what is certain of its text, or end the request."""
        req = self.slots[i][0]
        if req.first_token is None:
            req.first_token = time.monotonic()
        self.stats["generated_tokens"] += 1
        if self.eos is not None and tok == self.eos and not req.ignore_eos:
            self._finish(i, finish="stop")
            return
        req.tokens.append(tok)
        text = self.decode(req.tokens)
        if not text.endswith("\ufffd"):  # else a multi-byte character is not complete yet
            req.text = text
            cuts = [c for c in (text.find(st) for st in req.stop if st) if c >= 0]
            if cuts:  # a stop string: the text ends before it
                req.text = text[:min(cuts)]
                self._finish(i, finish="stop")
                return
            # hold back an ending that may become a stop string with the next tokens
            hold = max((k for st in req.stop for k in range(1, len(st)) if text.endswith(st[:k])), default=0)
            self._send(req, len(text) - hold)
        if len(req.tokens) >= req.max_tokens or self.engine.pos[i] >= self.engine.ctx:
            self._finish(i, finish="length")
            return
        self.slots[i][3] = tok

    @staticmethod
    def _send(req: Request, upto: int) -> None:
        if upto > req.sent:
            req.emit(Event("token", text=req.text[req.sent:upto], request=req))
            req.sent = upto

    def _finish(self, i: int, *, finish: str = "stop", error: str | None = None, quiet: bool = False) -> None:
        req = self.slots[i][0]
        self.slots[i] = None
        if quiet:
            return
        if error is not None:
            req.emit(Event("error", message=error, request=req))
        else:
            self._send(req, len(req.text))  # what was held back for a stop string that never came
            req.emit(Event("done", finish=finish, request=req))
