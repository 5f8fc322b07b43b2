"""The llama.cpp benchmark worker, run by path: ``PEER_PYTHON llama_worker.py SPEC_JSON``.

It runs under the peer's interpreter, which need not have ternlm (or torch) installed, so it imports
nothing from ternlm. Prints one JSON line: prefill and decode tok/s (best of ``repeats``) and peak RSS.
"""

import json, resource, sys, time
import numpy as np
spec = json.loads(sys.argv[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import llama_cpp
if not spec.get("repack", True):  # no extra CPU buffer types (AMX weight repacking): Llama() does not expose it
    import llama_cpp.llama_cpp as _C
    _default_params = _C.llama_model_default_params
    def _no_repack():
        p = _default_params()
        p.use_extra_bufts = False
        return p
    _C.llama_model_default_params = _no_repack
base = rss()
llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                      n_ctx=max(512, spec["prompt_tokens"] + spec["new_tokens"] + 8), n_batch=512, verbose=False)
ids = spec["ids"]
def run(n_new):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (n_new - 1) / (t2 - t1)
run(4)
res = [run(spec["new_tokens"]) for _ in range(spec["repeats"])]
print(json.dumps({"prefill_tok_s": max(r[0] for r in res), "decode_tok_s": max(r[1] for r in res),
                  "n_new_tokens": spec["new_tokens"], "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
                  "baseline_rss_mb": base, "peak_rss_mb": rss()}))
