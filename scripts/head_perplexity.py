"""Perplexity of a ternlm GPT-2 checkpoint on the fast decode engine, per LM-head storage.

    python scripts/head_perplexity.py runs/gpt2-mini-ternary ../shared/data/wikitext-2/wiki.test.raw

Shows what holding the LM head in fp16 or int8 (per-row absmax, W8A8 kernel) costs in quality;
`ternlm bench` shows what it buys in speed.
"""

import argparse

from ternlm.config import HEADS
from ternlm.data.text import load_text
from ternlm.eval.perplexity import perplexity
from ternlm.models.loading import load
from ternlm.runtime.gpt2 import GPT2Runtime, RuntimeConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="ternlm checkpoint directory (GPT-2 architecture)")
    p.add_argument("text", help="text file, directory or hub id")
    p.add_argument("--tokens", type=int, default=20480, help="tokens scored (default: 20480)")
    p.add_argument("--window", type=int, default=256, help="non-overlapping window length (default: 256)")
    a = p.parse_args()
    model, tok = load(a.checkpoint)
    text = load_text(a.text)
    base = None
    for head in HEADS:
        rt = GPT2Runtime(model, RuntimeConfig(head=head, max_seq_len=a.window))
        r = perplexity(rt.logits, tok, text, max_length=a.window, stride=a.window, max_windows=a.tokens // a.window)
        ppl = r["perplexity"]
        base = base or ppl
        print(f"head {head:5s} perplexity {ppl:10.3f} ({100 * (ppl / base - 1):+.3f}% vs fp32), "
              f"{r['n_tokens']} tokens scored")


if __name__ == "__main__":
    main()
