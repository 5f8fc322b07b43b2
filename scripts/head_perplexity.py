"""Perplexity of a ternlm GPT-2 checkpoint on the fast decode engine, per LM-head storage.

    python scripts/head_perplexity.py runs/gpt2-mini-ternary ../shared/data/wikitext-2/wiki.test.raw

Shows what holding the LM head in fp16 or int8 (per-row absmax, W8A8 kernel) costs in quality;
`ternlm bench` shows what it buys in speed.
"""

import argparse

from ternlm.checkpoint import from_pretrained
from ternlm.data.text import load_text
from ternlm.models.loading import load_tokenizer
from ternlm.runtime.gpt2 import HEADS, GPT2Runtime, RuntimeConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="ternlm checkpoint directory (GPT-2 architecture)")
    p.add_argument("text", help="text file, directory or hub id")
    p.add_argument("--tokens", type=int, default=20480, help="tokens scored (default: 20480)")
    p.add_argument("--window", type=int, default=256, help="non-overlapping window length (default: 256)")
    a = p.parse_args()
    model, tok = from_pretrained(a.checkpoint), load_tokenizer(a.checkpoint)
    text = load_text(a.text)
    ids = tok(text[: a.tokens * 10], return_tensors="pt").input_ids[0][: a.tokens]
    base = None
    for head in HEADS:
        ppl = GPT2Runtime(model, RuntimeConfig(head=head)).perplexity(ids, a.window)
        base = base or ppl
        print(f"head {head:5s} perplexity {ppl:10.3f} ({100 * (ppl / base - 1):+.3f}% vs fp32), {ids.numel()} tokens")


if __name__ == "__main__":
    main()
