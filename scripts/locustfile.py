"""Locust clients for scripts/load_test.py: each streams /v1/completions from an OpenAI-compatible server,
with no wait between requests, and reports two extra request types beside the completion itself:
"TTFT" (time to the first streamed text, ms) and "TOKENS" (one entry per completion whose size is the
number of streamed chunks carrying text: one per token on the servers measured here).

    LOAD_PROMPT="..." LOAD_MAX_TOKENS=64 locust -f scripts/locustfile.py --headless -u 16 -r 16 -t 60s --host URL
"""

import json
import os
import time

from locust import HttpUser, constant, events, task

PROMPT = os.environ.get("LOAD_PROMPT", "The history of the city begins with")
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "64"))
MODEL = os.environ.get("LOAD_MODEL") or None


class Client(HttpUser):
    wait_time = constant(0)

    @task
    def complete(self):
        # ignore_eos (llama-server's and ternlm's name; others ignore it): every request generates MAX_TOKENS
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True}
        if MODEL:
            body["model"] = MODEL
        t0 = time.perf_counter()
        first, n = None, 0
        # Connection: close for every server: llama-server closes a connection after a streamed reply, and a
        # client reusing it would count a refused request against it
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="completion", headers={"Connection": "close"}) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    if "error" in d:
                        r.failure(str(d["error"])[:200])
                        return
                    if d.get("choices") and d["choices"][0].get("text"):
                        if first is None:
                            first = time.perf_counter()
                        n += 1
            except Exception as e:  # a broken stream is a failed request
                r.failure(f"{type(e).__name__}: {e}")
                return
            r.success()
        if first is not None:
            events.request.fire(request_type="TTFT", name="first token", response_time=(first - t0) * 1000,
                                response_length=0, exception=None, context={})
        events.request.fire(request_type="TOKENS", name="generated", response_time=0, response_length=n,
                            exception=None, context={})
