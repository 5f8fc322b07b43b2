"""The benchmark's results: ratios between systems of one run, and the table printed from them."""

from __future__ import annotations

from ternlm.bench.config import SAME_HEAD


def ratios(rows: list[dict]) -> None:
    def find(system, variant):
        return next((r for r in rows if r["system"] == system and r["variant"] == variant), None)

    hf32 = find("hf", "fp32")
    for r in rows:
        r["x_hf_fp32"] = r["decode_tok_s"] / hf32["decode_tok_s"] if hf32 else None
        peer = find("llama_cpp", SAME_HEAD.get(r.get("head"), ""))
        r["x_llama_tq2_same_head"] = (r["decode_tok_s"] / peer["decode_tok_s"]
                                      if peer and r["system"] == "ternlm" else None)
        lb = find("llama_bench", SAME_HEAD.get(r.get("head"), ""))  # the same file, timed by llama-bench
        r["x_llama_bench"] = r["decode_tok_s"] / lb["decode_tok_s"] if lb and r["system"] == "ternlm" else None


def environment_line(env: dict) -> str:
    """One line saying what the numbers were measured on (``run.environment``'s record)."""
    commit = env.get("git_commit", "unknown") + (" (dirty)" if env.get("git_dirty") else "")
    cores = f", {env['physical_cores']} cores" if env.get("physical_cores") else ""
    return (f"ternlm {env.get('ternlm', '?')} at commit {commit}; CPU {env.get('cpu_model', 'unknown')}: "
            f"{env.get('threads')} threads used of {env.get('cpu_count')} logical CPUs{cores}; "
            f"ternlm kernels {env.get('kernel_level') or 'reference (no compiled extension)'}")


def format_table(res: dict) -> str:
    cols = [("system", "{}"), ("variant", "{}"), ("decode tok/s", "{:.1f}"), ("prefill tok/s", "{:.1f}"),
            ("x llama TQ2_0 same head", "{:.2f}"), ("x HF fp32", "{:.2f}"), ("file MB", "{:.1f}"),
            ("peak RSS MB", "{:.0f}"), ("MB/token", "{:.1f}"), ("GB/s", "{:.1f}"), ("% copy BW", "{:.0f}")]
    keys = ["system", "variant", "decode_tok_s", "prefill_tok_s", "x_llama_tq2_same_head", "x_hf_fp32", "file_bytes",
            "peak_rss_mb", "bytes_per_token", "achieved_gbs", "pct_of_copy_bw"]
    if any(r.get("x_llama_gguf") for r in res["rows"]):  # --model run with a named GGUF
        cols[4], keys[4] = ("x llama.cpp (first GGUF)", "{:.2f}"), "x_llama_gguf"
    if any(r.get("x_llama_bench") for r in res["rows"]):  # the same file timed by llama-bench
        cols.insert(5, ("x llama-bench", "{:.2f}"))
        keys.insert(5, "x_llama_bench")
    scale = {"file_bytes": 1e-6, "bytes_per_token": 1e-6}
    body = []
    for r in res["rows"]:
        cells = []
        for (_, fmt), k in zip(cols, keys):
            v = r.get(k)
            cells.append("-" if v is None else fmt.format(v * scale.get(k, 1) if isinstance(v, (int, float)) else v))
        body.append(cells)
    head = [c for c, _ in cols]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    if res.get("machine", {}).get("git_commit"):
        out = [environment_line(res["machine"]), "", *out]
    for s in res["skipped"]:
        out.append(f"skipped {s['system']} {s['variant']}: {s['reason']}")
    for r in res["rows"]:
        if "profile" in r:
            p = r["profile"]
            out.append(f"decode profile ({r['system']} {r['variant']}): step {p['step_ms']:.2f} ms = block linears "
                       f"{p['block_linears_ms']:.2f} + LM head {p['head_ms']:.2f} + other {p['other_ms']:.2f} ms")
    out.append(f"copy bandwidth {res['copy_bandwidth_gbs']:.1f} GB/s; command: {res['command']}")
    return "\n".join(out)
