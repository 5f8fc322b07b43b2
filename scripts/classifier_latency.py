"""Spam-classifier latency at batch 1: SmolLM2-135M as a sequence classifier in fp32, int8 absmax and
packed ternary (per-channel scales, 2-bit codes) with int8 activations (W1.58A8) and float ones (W1.58A16),
each ternary form at every kernel level this CPU has from AVX-512 VNNI up. Messages are SMS spam texts
repeated to the full 64 tokens, one at a time (ternlm.eval.cost.latency_per_message: median of 3 passes).

    python scripts/classifier_latency.py [--data DIR] [--messages 16] [--threads 2]

The weights are the untrained classification head on the base model (latency does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--messages", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    from ternlm.config import QuantConfig, TernaryConfig, method_config
    from ternlm.conversion import convert
    from ternlm.eval.cost import latency_per_message
    from ternlm.kernels import _ext
    from ternlm.models.loading import load_classifier
    from ternlm.models.sources import load_tokenizer
    from ternlm.nn.surgery import quantize_model

    transformers.logging.set_verbosity_error()
    model_dir = f"{a.data}/smollm2-135m"
    fp = load_classifier(model_dir).eval()
    tok = load_tokenizer(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fp.config.pad_token_id = tok.pad_token_id
    lines = open(f"{a.data}/sms_spam/SMSSpamCollection", encoding="utf-8").read().splitlines()
    texts = [(ln.split("\t", 1)[1].strip() + " ") * 12 for ln in lines[: a.messages]]  # >= 64 tokens each
    rows = {}

    def lat(m, name):
        r = latency_per_message(m, tok, texts, batch_size=1, max_length=64)
        rows[name] = r["ms_per_message"]
        print(f"{name:42s} {r['ms_per_message']:7.1f} ms/msg", flush=True)

    lat(fp, "fp32")
    lat(quantize_model(copy.deepcopy(fp), QuantConfig(weights=method_config("int8_absmax"))), "int8_absmax")
    levels = [lv for lv in _ext.available_levels() if lv in ("avx512_vnni", "amx")] or [_ext.get_level()]
    for act_bits, label in ((8, "W1.58A8"), (None, "W1.58A16")):
        tern = quantize_model(copy.deepcopy(fp), QuantConfig(weights=TernaryConfig(granularity="per_channel",
                                                                                   act_bits=act_bits)))
        convert(tern, fmt="2bit")
        for lv in levels:
            with _ext.use_level(lv):
                lat(tern, f"ternary packed {label} ({lv})")
    print("command: python scripts/classifier_latency.py " + " ".join(
        f"--{k} {v}" for k, v in vars(a).items() if v is not None))
    if a.json:
        json.dump({"ms_per_message": rows, "threads": a.threads, "messages": a.messages}, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
