"""``ternlm serve``: an OpenAI-compatible HTTP server over the batch engine (Starlette on uvicorn).

Endpoints, named as llama-server and vLLM name them:

    GET  /                      a chat page (one static file)
    GET  /health                {"status": "ok"} (no API key needed)
    GET  /v1/models             the served model
    POST /v1/completions        prompt -> text; "stream": true sends server-sent events ending in [DONE]
    POST /v1/chat/completions   messages -> the tokenizer's chat template -> text (streams too)
    POST /tokenize              {"content": text} -> {"tokens": [...]}
    POST /detokenize            {"tokens": [...]} -> {"content": text}
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, queue depth, busy slots, KV use

Why Starlette + uvicorn: the ASGI pair most Python model servers sit on (FastAPI is Starlette with
request models on top; here the requests are checked by ternlm itself so that every bad request gets
an OpenAI-style error object and a 400, never a 422 or a 500), with server-sent events as a streaming
response and SIGTERM handled by uvicorn (stop accepting, finish within the grace period, exit 0).

Bad requests: malformed JSON, a known field of the wrong type, max_tokens beyond the context, a prompt
longer than the context -> 400; an unknown model name -> 404; a wrong or missing API key -> 401; the
queue full -> 429 with Retry-After; a request past --timeout ends with an error.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ternlm.errors import TernlmError
from ternlm.serve.scheduler import Event, QueueFull, Request

STATIC = Path(__file__).with_name("static")


@dataclass
class ServeConfig:
    """model: a ternlm checkpoint or any model the decode engine covers (GPT-2, Llama, Qwen2). slots:
    sequences decoding together; ctx: tokens per slot (prompt + completion); queue: requests that may
    wait for a slot before new ones get 429; timeout: seconds a request may run; chunk: prompt tokens
    prefilled per scheduler turn; grace: seconds running requests get at shutdown."""

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    slots: int = 4
    ctx: int = 2048
    api_key: str | None = None
    queue: int = 64
    timeout: float = 600.0
    chunk: int = 128
    grace: float = 10.0
    model_name: str | None = None

    def __post_init__(self):
        for name, low in (("slots", 1), ("ctx", 2), ("queue", 0), ("chunk", 1), ("port", 0)):
            if int(getattr(self, name)) < low:
                raise TernlmError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if not self.timeout > 0 or self.grace < 0:
            raise TernlmError("--timeout must be > 0 and --grace >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        return d


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param=None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# The model behind the server


class Served:
    """The batch engine, its scheduler and tokenizer, loaded once."""

    def __init__(self, cfg: ServeConfig):
        from ternlm.models.loading import source_kind
        from ternlm.models.sources import load_tokenizer
        from ternlm.runtime.engine import DecodeEngine, RuntimeConfig
        from ternlm.serve.batch import BatchEngine
        from ternlm.serve.scheduler import Scheduler

        self.cfg = cfg
        kind = source_kind(cfg.model)
        rc = RuntimeConfig(head="auto", max_seq_len=None, step="python")
        if kind == "ternlm":
            from ternlm.runtime.lean import read_checkpoint

            ck = read_checkpoint(cfg.model)
            rc = RuntimeConfig(head="auto", max_seq_len=min(cfg.ctx, ck.arch.max_positions), step="python")
            engine = DecodeEngine.from_checkpoint(ck, rc)
            tok_src = ck.directory
        else:
            from ternlm.models.loading import load
            from ternlm.runtime.engine import describe

            model, _ = load(cfg.model, tokenizer=False)
            try:
                a = describe(model)
            except TernlmError as e:
                raise TernlmError(f"ternlm serve runs the decode engine's architectures: {e}") from None
            rc = RuntimeConfig(head="auto", max_seq_len=min(cfg.ctx, a.max_positions), step="python")
            engine = DecodeEngine(model, rc)
            tok_src = cfg.model
        self.tokenizer = load_tokenizer(tok_src)
        self.ctx = engine.max_seq_len
        self.batch = BatchEngine(engine, cfg.slots, self.ctx)
        eos = self.tokenizer.eos_token_id
        self.scheduler = Scheduler(self.batch, self._decode, eos, queue=cfg.queue, chunk=cfg.chunk)
        self.name = cfg.model_name or Path(str(cfg.model)).name or str(cfg.model)
        self.started = time.time()

    def _decode(self, ids: list) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: list) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise BadRequest(f"the chat template cannot render these messages: {str(e).splitlines()[0][:200]}") \
                from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


# ---------------------------------------------------------------------------------------------
# Request parsing


def _field(body: dict, name: str, types, default=None, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{name}' must be {what or types}", param=name)
    if not isinstance(v, types):
        raise BadRequest(f"'{name}' must be {what or types}", param=name)
    if check is not None and not check(v):
        raise BadRequest(f"'{name}' is out of range: {what}", param=name)
    return v


def sampling(body: dict) -> dict:
    num = (int, float)
    out = {
        "max_tokens": _field(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1"),
        "temperature": float(_field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 10, "a number in [0, 10]")),
        "top_p": float(_field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        "top_k": _field(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
        "seed": _field(body, "seed", int, None, None, "an integer"),
        "stream": _field(body, "stream", bool, False, None, "a boolean"),
        "ignore_eos": _field(body, "ignore_eos", bool, False, None, "a boolean"),
    }
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16):
        raise BadRequest("'stop' must be a string or a list of at most 16 strings", param="stop")
    out["stop"] = tuple(stop)
    n = _field(body, "n", int, 1, None, "an integer")
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    if out["max_tokens"] is None:
        out["max_tokens"] = 16
    return out


# ---------------------------------------------------------------------------------------------
# The app


# the two generation endpoints' response shapes: ids and object names, a whole response's choice, a streamed
# chunk's delta, and the chunk a chat stream opens with
COMPLETION_SHAPE = {
    "prefix": "cmpl", "object": "text_completion", "chunk": "text_completion", "first": None,
    "choice": lambda text, fin: {"index": 0, "text": text, "logprobs": None, "finish_reason": fin},
    "delta": lambda text, fin: {"index": 0, "text": text, "logprobs": None, "finish_reason": fin}}
CHAT_SHAPE = {
    "prefix": "chatcmpl", "object": "chat.completion", "chunk": "chat.completion.chunk",
    "first": {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
    "choice": lambda text, fin: {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fin},
    "delta": lambda text, fin: {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": fin}}


def build_app(served: Served):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    cfg = served.cfg
    sched = served.scheduler

    def fail(e: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(str(e), e.kind, e.param), status_code=e.status, headers=e.headers)

    def authorized(request: HTTPRequest) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {cfg.api_key}":
            raise BadRequest("a valid API key is needed (Authorization: Bearer KEY)", 401, "authentication_error")

    async def body_of(request: HTTPRequest) -> dict:
        authorized(request)
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served.name:
            raise BadRequest(f"the model '{model}' does not exist; this server serves '{served.name}'", 404,
                             param="model", kind="not_found_error")
        return body

    def check_fits(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        if len(ids) >= served.ctx:
            raise BadRequest(f"the prompt is {len(ids)} tokens; the context holds {served.ctx}", param="prompt")
        if len(ids) + max_tokens > served.ctx:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"({served.ctx} tokens)", param="max_tokens")

    async def run(request: HTTPRequest, ids: list[int], sp: dict, shape) -> object:
        """Submit, then stream events as SSE or collect them into one response."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = sp["seed"] if sp["seed"] is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        req = Request(ids, sp["max_tokens"], sp["temperature"], sp["top_p"], sp["top_k"], seed, sp["stop"],
                      time.monotonic() + cfg.timeout, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                      ignore_eos=sp["ignore_eos"])
        try:
            sched.submit(req)
        except QueueFull as e:
            raise BadRequest(f"server busy: {e}; retry later", 429, "rate_limit_error",
                             headers={"Retry-After": "1"}) from None
        except TernlmError as e:
            raise BadRequest(str(e), 503, "server_error", headers={"Retry-After": "5"}) from None
        rid, created = f"{shape['prefix']}-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens),
                    "total_tokens": len(ids) + len(req.tokens)}

        if not sp["stream"]:
            parts, finish = [], None
            try:
                while True:
                    try:
                        ev: Event = await asyncio.wait_for(events.get(), 0.5)
                    except asyncio.TimeoutError:  # no event yet: is the client still there?
                        if await request.is_disconnected():
                            sched.cancel(req)  # it went away: its slot is free at the next token boundary
                            return JSONResponse(error_body("client disconnected"), status_code=499)
                        continue
                    if ev.kind == "token":
                        parts.append(ev.text)
                    elif ev.kind == "done":
                        finish = ev.finish
                        break
                    else:
                        raise BadRequest(ev.message, 500 if "timeout" not in ev.message else 408, "server_error")
            except asyncio.CancelledError:
                sched.cancel(req)
                raise
            return JSONResponse({"id": rid, "object": shape["object"], "created": created, "model": served.name,
                                 "choices": [shape["choice"]("".join(parts), finish)], "usage": usage()})

        async def stream():
            try:
                if shape["first"] is not None:
                    yield _sse({"id": rid, "object": shape["chunk"], "created": created, "model": served.name,
                                "choices": [shape["first"]]})
                while True:
                    ev = await events.get()
                    if ev.kind == "token":
                        yield _sse({"id": rid, "object": shape["chunk"], "created": created, "model": served.name,
                                    "choices": [shape["delta"](ev.text, None)]})
                    elif ev.kind == "done":
                        yield _sse({"id": rid, "object": shape["chunk"], "created": created, "model": served.name,
                                    "choices": [shape["delta"]("", ev.finish)], "usage": usage()})
                        break
                    else:
                        yield _sse(error_body(ev.message, "server_error"))
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slot now
                if not req.cancelled:
                    sched.cancel(req)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def api(handler):
        """An endpoint whose BadRequest becomes its OpenAI-style error response."""
        async def endpoint(request: HTTPRequest):
            try:
                return await handler(request)
            except BadRequest as e:
                return fail(e)
        return endpoint

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return served.encode(prompt)
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt)):
            raise BadRequest("'prompt' must be a string or a list of token ids", param="prompt")
        if any(not 0 <= t < served.batch.vocab_size for t in prompt):
            raise BadRequest("prompt token ids outside the vocabulary", param="prompt")
        return list(prompt)

    def message_ids(messages) -> list[int]:
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise BadRequest("'messages' must be a non-empty list of {role, content} strings", param="messages")
        return served.chat_ids([{"role": m["role"], "content": m["content"]} for m in messages])

    def generation(ids_of, field: str, shape: dict):
        """/v1/completions and /v1/chat/completions: the request's ids, then run them in that response shape."""
        @api
        async def endpoint(request: HTTPRequest):
            body = await body_of(request)
            sp = sampling(body)
            ids = ids_of(body.get(field))
            check_fits(ids, sp["max_tokens"])
            return await run(request, ids, sp, shape)
        return endpoint

    completions = generation(prompt_ids, "prompt", COMPLETION_SHAPE)
    chat = generation(message_ids, "messages", CHAT_SHAPE)

    @api
    async def tokenize(request: HTTPRequest):
        content = (await body_of(request)).get("content")
        if not isinstance(content, str):
            raise BadRequest("'content' must be a string", param="content")
        return JSONResponse({"tokens": served.encode(content)})

    @api
    async def detokenize(request: HTTPRequest):
        tokens = (await body_of(request)).get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and
                                                 0 <= t < served.batch.vocab_size for t in tokens)):
            raise BadRequest("'tokens' must be a list of token ids in the vocabulary", param="tokens")
        return JSONResponse({"content": served.tokenizer.decode(tokens)})

    @api
    async def models(request: HTTPRequest):
        authorized(request)
        return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model",
                                                          "created": int(served.started), "owned_by": "ternlm",
                                                          "meta": {"ctx": served.ctx, "slots": cfg.slots}}]})

    async def health(request: HTTPRequest):
        return JSONResponse({"status": "ok", "slots_idle": cfg.slots - sched.busy_slots,
                             "slots_busy": sched.busy_slots})

    async def metrics(request: HTTPRequest):
        b = served.batch
        kv = sum(b.pos[i] for i in range(b.slots) if sched.slots[i] is not None) / (b.slots * b.ctx)
        rows = [("requests_total", "counter", "requests accepted", sched.stats["requests"]),
                ("prompt_tokens_total", "counter", "prompt tokens accepted", sched.stats["prompt_tokens"]),
                ("generated_tokens_total", "counter", "tokens generated", sched.stats["generated_tokens"]),
                ("tokens_per_second", "gauge", "tokens generated per second, last 10 s", sched.tokens_per_second()),
                ("queue_depth", "gauge", "requests waiting for a slot", sched.queue_depth),
                ("busy_slots", "gauge", "slots generating or prefilling", sched.busy_slots),
                ("slots", "gauge", "slots", b.slots),
                ("kv_cache_usage_ratio", "gauge", "KV cache positions in use over all slots", kv)]
        text = "".join(f"# HELP ternlm_{n} {h}\n# TYPE ternlm_{n} {t}\nternlm_{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def page(request: HTTPRequest):
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        msg = "not found" if status == 404 else getattr(exc, "detail", "error")
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {msg}",
                                       "not_found_error" if status == 404 else "invalid_request_error"),
                            status_code=status)

    async def crashed(request, exc):  # never a traceback to the client
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
              Route("/metrics", metrics)]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.stop(cfg.grace)

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: not_found, Exception: crashed})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(cfg: ServeConfig) -> int:
    """Load the model, then serve until SIGINT / SIGTERM (graceful: running requests get ``cfg.grace``
    seconds). Returns 0."""
    import uvicorn

    served = Served(cfg)
    app = build_app(served)
    print(f"ternlm serve: {served.name} on http://{cfg.host}:{cfg.port} ({cfg.slots} slots x {served.ctx} tokens"
          f"{', API key required' if cfg.api_key else ''})", flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=int(cfg.grace), lifespan="on")
    _Server(config).run()
    print("ternlm serve: stopped", flush=True)
    return 0


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGINT / SIGTERM end in a normal return (exit status 0) after
        the graceful shutdown, where uvicorn would re-raise the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            prev = {s: signal.signal(s, lambda sig, frame: self.handle_exit(sig, frame)) for s in sigs}
            try:
                yield
            finally:
                for s, h in prev.items():
                    signal.signal(s, h)

    return Server


def _Server(config):
    return _server_class()(config)
