"""Load test: ternlm serve against llama.cpp's llama-server and llama-cpp-python's server, on the same
machine and threads, one server at a time, with locust clients (scripts/locustfile.py).

    bash scripts/load_test.sh                      # sets up the tools, then runs this
    python scripts/load_test.py --ternlm runs/smol-g64 --gguf ../shared/data/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --users 1,4,16,64 --seconds 60 --out runs/load

For each server and each number of concurrent clients (every client sends its next request as soon as
the last one ended): aggregate generated tokens per second, p50 / p99 time to first token, completed
requests, errors; and each server's peak RSS over the whole run (the server process and its children,
sampled every 0.2 s). ``--soak S`` instead runs ternlm serve alone at 16 clients for S seconds and
reports RSS at the start and the end. Results as JSON and a markdown table in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = ("The history of the city begins in the first century, when a small fishing village grew around the "
          "harbour. Over the next")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RSS:
    """Peak (and latest) RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self.now, self.samples = psutil.Process(pid), 0, 0, []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.now = sum(p.memory_info().rss for p in procs)
                self.peak = max(self.peak, self.now)
                self.samples.append((time.time(), self.now))
            except psutil.Error:
                pass
            time.sleep(0.2)


def start(cmd: list[str], port: int, env=None, log: Path | None = None) -> subprocess.Popen:
    """Start a server; ready once GET /v1/models answers (llama-cpp-python's server has no /health)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    import urllib.request

    for _ in range(600):
        if p.poll() is not None:
            sys.exit(f"{cmd[0]} exited with {p.returncode} (log: {log})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                if r.status == 200:
                    return p
        except Exception:
            time.sleep(0.5)
    p.kill()
    sys.exit(f"{cmd[0]} did not come up on port {port}")


def locust(url: str, users: int, seconds: int, out: Path, max_tokens: int, model: str | None) -> dict:
    prefix = out / f"u{users}"
    env = {**os.environ, "LOAD_PROMPT": PROMPT, "LOAD_MAX_TOKENS": str(max_tokens), "LOAD_MODEL": model or ""}
    t0 = time.time()
    subprocess.run([LOCUST, "-f", str(REPO / "scripts" / "locustfile.py"), "--headless", "-u", str(users), "-r",
                    str(users), "-t", f"{seconds}s", "--host", url, "--csv", str(prefix), "--only-summary",
                    "--stop-timeout", "30", "--loglevel", "ERROR"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    comp = rows.get(("POST", "completion"), {})
    ttft = rows.get(("TTFT", "first token"), {})
    toks = rows.get(("TOKENS", "generated"), {})
    n_tok = float(toks.get("Average Content Size", 0) or 0) * int(toks.get("Request Count", 0) or 0)
    return {"users": users, "seconds": seconds, "wall": wall, "requests": int(comp.get("Request Count", 0) or 0),
            "errors": int(comp.get("Failure Count", 0) or 0), "tokens": n_tok, "tok_s": n_tok / seconds,
            "ttft_p50_ms": float(ttft.get("50%", "nan") or "nan"), "ttft_p99_ms": float(ttft.get("99%", "nan") or "nan")}


def warm(url: str, model: str | None) -> None:
    """One request before measuring (first-call costs out of the numbers)."""
    import urllib.request

    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **({"model": model} if model else {})}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=300).read()


def servers(a) -> dict:
    port = free_port()
    py = sys.executable
    llama_py = str(REPO / ".venv-llama" / "bin" / "python")
    return {
        "ternlm": ([py, "-m", "ternlm.cli", "serve", a.ternlm, "--port", str(port), "--slots", str(a.slots),
                    "--ctx", str(a.ctx), "--queue", "256", "--name", "model"], port, "model"),
        "llama-server": ([str(REPO / ".venv-llama" / "tools" / "llama-server"), "-m", a.gguf, "--port", str(port),
                          "-t", str(a.threads), "-np", str(a.slots), "-c", str(a.ctx * a.slots), "-cb",
                          "--no-webui", "--no-repack"], port, None),
        "llama-cpp-python": ([llama_py, str(REPO / "scripts" / "llama_cpp_server.py"), "--model", a.gguf, "--port", str(port),
                              "--n_threads", str(a.threads), "--n_ctx", str(a.ctx),
                              # queue concurrent requests instead of cutting the running one short (its default)
                              "--interrupt_requests", "False"], port, None),
    }


LOCUST = shutil.which("locust") or str(REPO / ".venv-load" / "bin" / "locust")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ternlm", required=True, help="the model ternlm serve runs (a ternlm checkpoint)")
    ap.add_argument("--gguf", required=True, help="the GGUF file the llama.cpp servers run")
    ap.add_argument("--systems", default="ternlm,llama-server,llama-cpp-python")
    ap.add_argument("--users", default="1,4,16,64")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512, help="tokens per slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--soak", type=int, default=0, help="seconds of ternlm serve alone at 16 clients (RSS start/end)")
    ap.add_argument("--out", default="runs/load")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    results = {"config": vars(a), "prompt": PROMPT, "systems": {}}
    table = servers(a)
    names = ["ternlm"] if a.soak else [s for s in a.systems.split(",") if s]
    for name in names:
        cmd, port, model = table[name]
        d = out / name
        d.mkdir(exist_ok=True)
        p = start(cmd, port, env, d / "server.log")
        rss = RSS(p.pid)
        url = f"http://127.0.0.1:{port}"
        try:
            warm(url, model)
            if a.soak:
                time.sleep(2)
                start_rss = rss.now
                r = locust(url, 16, a.soak, d, a.max_tokens, model)
                r.update(rss_start_mb=start_rss / 1e6, rss_end_mb=rss.now / 1e6, rss_peak_mb=rss.peak / 1e6)
                results["soak"] = r
                print(f"soak: {r['requests']} requests, {r['errors']} errors, {r['tok_s']:.1f} tok/s, RSS "
                      f"{r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f} MB (peak {r['rss_peak_mb']:.0f})", flush=True)
            else:
                runs = []
                for u in [int(x) for x in a.users.split(",")]:
                    r = locust(url, u, a.seconds, d, a.max_tokens, model)
                    runs.append(r)
                    print(f"{name} u={u}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms p99 "
                          f"{r['ttft_p99_ms']:.0f} ms, {r['requests']} requests, {r['errors']} errors", flush=True)
                results["systems"][name] = {"runs": runs, "peak_rss_mb": rss.peak / 1e6, "command": " ".join(cmd)}
        finally:
            rss.stop.set()
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    (out / "load.json").write_text(json.dumps(results, indent=2))
    if not a.soak:
        lines = ["| server | clients | generated tok/s | TTFT p50 ms | TTFT p99 ms | requests | errors | peak RSS MB |",
                 "|---|---|---|---|---|---|---|---|"]
        for name, s in results["systems"].items():
            for r in s["runs"]:
                lines.append(f"| {name} | {r['users']} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                             f"{r['ttft_p99_ms']:.0f} | {r['requests']} | {r['errors']} | {s['peak_rss_mb']:.0f} |")
        (out / "load.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
