"""ternlm serve: the OpenAI client against a tiny model, continuous batching, bad requests, shutdown."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, gpt2_tokenizer):
    """A tiny ternary GPT-2 with a peaked head (no near-ties between batched and single runs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ternlm.checkpoint import save_pretrained
    from ternlm.config import TernaryConfig
    from ternlm.conversion import convert

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8)
    tok = gpt2_tokenizer
    tok.chat_template = CHAT_TEMPLATE
    return save_pretrained(convert(m, TernaryConfig(act_bits=8)), tok, tmp_path_factory.mktemp("serve") / "ck",
                           float_dtype="fp32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in this process (uvicorn in a thread)."""

    def __init__(self, **kw):
        import uvicorn

        from ternlm.serve.app import ServeConfig, Served, build_app

        self.cfg = ServeConfig(port=_free_port(), **kw)
        self.served = Served(self.cfg)
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.served), host="127.0.0.1", port=self.cfg.port,
                                                    log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.cfg.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Running(model=str(ckpt), slots=4, ctx=128, model_name="tiny")
    yield s
    s.close()


def _greedy(ckpt, prompt: str, n: int) -> str:
    """What `ternlm generate` prints for the prompt (the decode engine, greedy)."""
    import io

    from ternlm.generate import GenerateConfig, main_generate

    out = io.StringIO()
    main_generate(str(ckpt), prompt, GenerateConfig(max_new_tokens=n, engine="fast"), out=out)
    text = out.getvalue()[len(prompt):]
    return text[:-1] if text.endswith("\n") else text  # the command ends its output with a newline


def test_openai_client_completions_chat_and_streaming(server, ckpt):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    prompt = "The history of the city"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _greedy(ckpt, prompt, 12)  # greedy = ternlm generate's tokens
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    msgs = [{"role": "user", "content": "Hello there"}]
    c = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    text = c.choices[0].message.content
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    # sampling is seeded
    a = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, seed=7).choices[0].text
    b = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, seed=7).choices[0].text
    assert a == b


def test_sse_stream_ends_with_done_and_stop_strings(server):
    import httpx

    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    full = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    stop = full[3:6]
    r = httpx.post(server.url + "/v1/completions",
                   json={"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[:full.index(stop)] and r["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_equal_their_single_runs(server):
    """Continuous batching: requests sharing decode steps (each slot its own KV cache) produce what
    they produce alone."""
    import httpx

    prompts = ["The history of the city", "In 1998, the team", "A", "Colourless green ideas sleep furiously and"]
    alone = [httpx.post(server.url + "/v1/completions", json={"prompt": p, "max_tokens": 20, "temperature": 0},
                        timeout=60).json()["choices"][0]["text"] for p in prompts]
    out = [None] * len(prompts)

    def go(i):
        out[i] = httpx.post(server.url + "/v1/completions",
                            json={"prompt": prompts[i], "max_tokens": 20, "temperature": 0}, timeout=60).json()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o["choices"][0]["text"] for o in out] == alone
    m = httpx.get(server.url + "/metrics").text
    for name in ("ternlm_requests_total", "ternlm_generated_tokens_total", "ternlm_tokens_per_second",
                 "ternlm_queue_depth", "ternlm_busy_slots", "ternlm_kv_cache_usage_ratio"):
        assert f"\n{name} " in "\n" + m


def test_tokenize_detokenize_models_health_page(server):
    import httpx

    toks = httpx.post(server.url + "/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": toks}).json()["content"] == "Hello world"
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "ternlm chat" in page.text and "/v1/chat/completions" in page.text


@pytest.mark.parametrize("body,status,text", [
    (b"{not json", 400, "not valid JSON"),
    (b'["a list"]', 400, "must be a JSON object"),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 400, "'max_tokens' must be"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "'temperature' must be"),
    (json.dumps({"prompt": "hi", "max_tokens": 1000}).encode(), 400, "exceeds the context"),
    (json.dumps({"prompt": "word " * 300}).encode(), 400, "the context holds"),
    (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": 7}).encode(), 400, "'prompt' must be"),
    (json.dumps({"prompt": "hi", "n": 2}).encode(), 400, "only n=1"),
])
def test_bad_requests_get_openai_errors(server, body, status, text):
    import httpx

    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert text in err["message"] and err["type"]
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key_queue_disconnect_and_timeout(ckpt):
    import httpx

    s = Running(model=str(ckpt), slots=1, ctx=256, api_key="sekret", queue=0, timeout=30)
    try:
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth).status_code == 200
        slow = s.served.batch.decode  # a slow model: a request holds its slot long enough to see the queue
        s.served.batch.decode = lambda *a: (time.sleep(0.02), slow(*a))[1]
        # a streaming client that goes away frees its slot at once
        with httpx.stream("POST", s.url + "/v1/completions", headers=auth,
                          json={"prompt": "hi", "max_tokens": 200, "temperature": 1.0, "stream": True,
                                "ignore_eos": True}) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the stream, which frees the slot
            next(lines)
            # the one slot is busy and the queue holds none: the next request is turned away
            busy = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth)
            assert busy.status_code == 429 and busy.headers["retry-after"] and "server busy" in busy.json()["error"]["message"]
        for _ in range(100):
            if httpx.get(s.url + "/health").json()["slots_busy"] == 0:
                break
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json()["slots_busy"] == 0
    finally:
        s.close()
    s = Running(model=str(ckpt), slots=1, ctx=256, timeout=0.01)
    try:
        slow = s.served.batch.decode
        s.served.batch.decode = lambda *a: (time.sleep(0.02), slow(*a))[1]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 100}, timeout=30)
        assert r.status_code == 408 and "--timeout" in r.json()["error"]["message"]
    finally:
        s.close()


def test_sigterm_stops_cleanly(ckpt):
    """The command: SIGTERM -> stop accepting, finish, exit 0."""
    import httpx

    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "ternlm.cli", "serve", str(ckpt), "--port", str(port), "--ctx", "64",
                          "--grace", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(p.stderr.read() if p.poll() is not None else "server did not start")
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_serve_bad_model_is_one_line(tmp_path):
    from tests.test_cli import assert_one_line_error, run

    assert_one_line_error(run("serve", str(tmp_path / "nope")), "no such file or directory")
    assert_one_line_error(run("serve", str(tmp_path), "--slots", "0"), "--slots must be >= 1")


def test_chat_page_in_a_browser(server):
    """The chat page streams a reply in a real headless browser (skipped where none is installed)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; apt-get install chromium)")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#prompt", "Hello there")
            page.fill("#max", "8")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.bot').length > 0 && "
                                   "document.querySelector('#stats').textContent.includes('tokens')", timeout=30000)
            assert page.inner_text(".user").startswith("you: Hello there")
            assert "tokens" in page.inner_text("#stats")
        finally:
            browser.close()
