"""The ``ternlm`` command: a thin layer that builds a config and calls one library function.

Errors a user can cause end in one line on stderr and exit status 2; no traceback (set
TERNLM_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_ternary_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ternary quantization")
    g.add_argument("--granularity", default="per_tensor", choices=["per_tensor", "per_channel", "per_group"],
                   help="one scale per tensor (BitNet), per output channel, or per group (default: per_tensor)")
    g.add_argument("--group-size", type=int, default=128, help="weights per scale with per_group (default: 128)")
    g.add_argument("--scale-mode", default="absmean", choices=["absmean", "fit"],
                   help="absmean = BitNet gamma; fit = least-squares scale for the chosen codes")
    g.add_argument("--act-bits", type=int, default=None, choices=[8, 4],
                   help="quantize activations per token (W1.58A8 / W1.58A4); default float (A16)")
    g.add_argument("--lambda-warmup", type=int, default=0,
                   help="QAT: blend fp -> ternary weights over this many steps (default: 0)")
    g.add_argument("--project-after-step", action="store_true",
                   help="QAT: project latent weights to ternary after every optimizer step")


def _ternary_config(a):
    from ternlm.config import TernaryConfig

    return TernaryConfig(granularity=a.granularity, group_size=a.group_size, scale_mode=a.scale_mode,
                         act_bits=a.act_bits, lambda_warmup_steps=a.lambda_warmup,
                         project_after_step=a.project_after_step)


def cmd_pipeline(a) -> int:
    from ternlm.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        model=a.model, gguf_file=a.gguf_file, random_init=a.random_init, data=a.data, text=a.text,
        text_config=a.text_config, text_split=a.text_split, out=a.out, seed=a.seed, max_length=a.max_length,
        batch_size=a.batch_size, epochs=a.epochs, lr=a.lr, qat_epochs=a.qat_epochs, qat_lr=a.qat_lr,
        qat_seeds=a.qat_seeds, ternary=_ternary_config(a), limit_train=a.limit_train, limit_test=a.limit_test,
        eval_batch_size=a.eval_batch_size, ppl_max_length=a.ppl_max_length, ppl_stride=a.ppl_stride,
        ppl_windows=a.ppl_windows, lm_qat_text=a.lm_qat_text, lm_qat_steps=a.lm_qat_steps,
        latency_messages=a.latency_messages, robustness=not a.no_robustness, robustness_limit=a.robustness_limit,
        gen_tokens=a.gen_tokens, progress=not a.quiet,
        baselines=tuple(b.strip() for b in a.baselines.split(",") if b.strip()))
    run_pipeline(cfg)
    return 0


def cmd_verify(a) -> int:
    import json

    from ternlm.config import QuantConfig
    from ternlm.models.loading import load_causal_lm
    from ternlm.nn.surgery import quantize_model
    from ternlm.nn.verify import verify
    from ternlm.fileio import atomic_write_text

    model = load_causal_lm(a.model, gguf_file=a.gguf_file, random_init=a.random_init)
    if a.quantize:
        quantize_model(model, QuantConfig(weights=_ternary_config(a), include=tuple(a.include or ()),
                                          exclude=tuple(a.exclude or ())))
    rep = verify(model)
    print(rep.format())
    if a.json:
        from pathlib import Path

        atomic_write_text(Path(a.json), json.dumps(rep.to_dict(), indent=2))
    return 0 if rep.ok else 1


def cmd_pretrain(a) -> int:
    from ternlm.train.lm import LMTrainConfig
    from ternlm.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(config=a.config, texts=tuple(a.text), out=a.out, n_layer=a.n_layer, n_embd=a.n_embd,
                         n_head=a.n_head, n_positions=a.n_positions, progress=not a.quiet,
                         train=LMTrainConfig(steps=a.steps, batch_size=a.batch_size, block_size=a.block_size,
                                             lr=a.lr, warmup_steps=a.warmup, seed=a.seed))
    log = pretrain(cfg)
    print(f"saved {a.out}: {log['n_params']:,} params, final loss {log['final_loss']:.3f}, "
          f"{log['seconds_per_step']:.2f} s/step")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def cmd_generate(a) -> int:
    from ternlm.generate import GenerateConfig, main_generate

    main_generate(a.model, a.prompt, GenerateConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                                    top_k=a.top_k, top_p=a.top_p, seed=a.seed, engine=a.engine,
                                                    head=a.head),
                  gguf_file=a.gguf_file)
    return 0


def cmd_quantize(a) -> int:
    from ternlm.checkpoint import quantize_pretrained
    from ternlm.config import QuantConfig, TernaryConfig

    act = None if a.act_bits == 16 else a.act_bits
    tcfg = TernaryConfig(granularity=a.granularity, group_size=a.group_size, scale_mode=a.scale_mode, act_bits=act)
    qc = QuantConfig(weights=tcfg, include=tuple(a.include or ()), exclude=tuple(a.exclude or ()))
    out = quantize_pretrained(a.model, a.out, qc, a.format, gguf_file=a.gguf_file, random_init=a.random_init,
                              float_dtype=a.float_dtype)
    from ternlm.checkpoint import checkpoint_summary

    print(checkpoint_summary(out))
    return 0


def cmd_export(a) -> int:
    from ternlm.export.gguf import export_gguf

    if a.format != "gguf":
        from ternlm.errors import TernlmError

        raise TernlmError(f"unknown export format {a.format!r}; only gguf is supported")
    out = export_gguf(a.model, a.out, a.type, head_dtype=a.head_dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {a.type.upper()} ternary layers, "
          f"{a.head_dtype} embeddings/head)")
    return 0


def cmd_bench(a) -> int:
    from ternlm.bench import bench_main

    bench_main(a)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ternlm", description="1.58-bit ternary language models.")
    p.add_argument("--version", action="version", version=f"ternlm {__import__('ternlm').__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    # pipeline
    q = sub.add_parser("pipeline", help="fp32 vs ternary PTQ vs ternary QAT vs int8 baselines on SMS spam",
                       description="Fine-tune, quantize, QAT-recover and compare; writes report.json, report.md and plots.")
    q.add_argument("--model", default="gpt2", help="hub id or local directory (default: gpt2)")
    q.add_argument("--gguf-file", default=None, help="GGUF file inside --model dir to load (dequantized)")
    q.add_argument("--random-init", action="store_true", help="build the model from its config with random weights")
    q.add_argument("--data", default="ucirvine/sms_spam",
                   help="SMS spam: hub id or local TSV (label<TAB>text) / CSV (default: ucirvine/sms_spam)")
    q.add_argument("--text", default="wikitext", help="perplexity text: hub id or local file/dir (default: wikitext)")
    q.add_argument("--text-config", default="wikitext-2-raw-v1")
    q.add_argument("--text-split", default="test")
    q.add_argument("--out", default="runs/pipeline", help="output directory (default: runs/pipeline)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-length", type=int, default=64, help="tokens per message (default: 64)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--epochs", type=float, default=1.0, help="fp32 fine-tuning epochs (default: 1)")
    q.add_argument("--lr", type=float, default=5e-5, help="fp32 fine-tuning learning rate (default: 5e-5)")
    q.add_argument("--qat-epochs", type=float, default=2.0, help="QAT epochs (default: 2)")
    q.add_argument("--qat-lr", type=float, default=3e-4, help="QAT learning rate (default: 3e-4)")
    q.add_argument("--qat-seeds", type=int, default=1, help="QAT runs with seeds seed, seed+1, ... (default: 1)")
    q.add_argument("--limit-train", type=int, default=None, help="stratified subsample of the training split")
    q.add_argument("--limit-test", type=int, default=None, help="stratified subsample of the test split")
    q.add_argument("--eval-batch-size", type=int, default=32)
    q.add_argument("--ppl-max-length", type=int, default=256, help="perplexity window (default: 256)")
    q.add_argument("--ppl-stride", type=int, default=256, help="perplexity stride (default: 256)")
    q.add_argument("--ppl-windows", type=int, default=40, help="max perplexity windows (default: 40)")
    q.add_argument("--lm-qat-text", default=None, help="training text for LM QAT (omit to skip LM QAT)")
    q.add_argument("--lm-qat-steps", type=int, default=0, help="LM QAT steps (default: 0)")
    q.add_argument("--latency-messages", type=int, default=64)
    q.add_argument("--no-robustness", action="store_true", help="skip the perturbed-input evaluation")
    q.add_argument("--robustness-limit", type=int, default=400, help="test messages used for robustness")
    q.add_argument("--gen-tokens", type=int, default=30, help="tokens per generation sample")
    q.add_argument("--baselines", default="int8_absmax,int8_zeropoint,llm_int8",
                   help="comma-separated int8 baselines to run (default: all three)")
    q.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    _add_ternary_args(q)
    q.set_defaults(fn=cmd_pipeline)

    # verify
    v = sub.add_parser("verify", help="report how ternary a model's linear layers are",
                       description="Per layer: share of weights in {-1,0,+1}*scale, zeros, scales, bits per weight. "
                                   "Exit status 1 if a layer that should be ternary is not.")
    v.add_argument("model", help="hub id or local directory")
    v.add_argument("--gguf-file", default=None)
    v.add_argument("--random-init", action="store_true")
    v.add_argument("--quantize", action="store_true", help="apply ternary PTQ before verifying")
    v.add_argument("--include", nargs="*", help="fnmatch patterns of module names to quantize")
    v.add_argument("--exclude", nargs="*", help="fnmatch patterns of module names to keep")
    v.add_argument("--json", default=None, help="also write the report as JSON")
    _add_ternary_args(v)
    v.set_defaults(fn=cmd_verify)

    # pretrain
    t = sub.add_parser("pretrain", help="pre-train a small GPT-2-architecture LM on local text",
                       description="Train a GPT-2-architecture LM from scratch and save it as a HF directory.")
    t.add_argument("--config", default="gpt2", help="config + tokenizer source (hub id or dir; default: gpt2)")
    t.add_argument("--text", action="append", required=True, help="training text file/dir/hub id (repeatable)")
    t.add_argument("--out", default="runs/gpt2-mini")
    t.add_argument("--n-layer", type=int, default=4)
    t.add_argument("--n-embd", type=int, default=256)
    t.add_argument("--n-head", type=int, default=4)
    t.add_argument("--n-positions", type=int, default=256)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--block-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_pretrain)

    # generate
    g = sub.add_parser("generate", help="stream a continuation and report tokens/s",
                       description="Generate text (KV cache on) from a ternlm checkpoint or any causal LM.")
    g.add_argument("--model", required=True, help="ternlm checkpoint dir, HF model dir or hub id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--gguf-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--engine", default="auto", choices=["auto", "hf", "fast"],
                   help="fast = ternlm's lean GPT-2 decode loop (static KV cache, packed kernels); hf = "
                        "transformers generate; auto = fast for GPT-2 ternlm checkpoints, else hf")
    g.add_argument("--head", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                   help="fast engine: LM-head storage; int8 = per-row int8 weights, W8A8 kernel (default: fp32)")
    g.set_defaults(fn=cmd_generate)

    # quantize
    z = sub.add_parser("quantize", help="post-training quantize a HF causal LM to packed ternary and save it",
                       description="Load a causal LM (hub id, local dir, GGUF), replace its block linear layers by "
                                   "packed ternary TernaryLinear layers and save a ternlm checkpoint directory.")
    z.add_argument("model", help="hub id or local directory")
    z.add_argument("-o", "--out", required=True, help="checkpoint directory to write")
    z.add_argument("--format", default="2bit", choices=["2bit", "base3"],
                   help="packed storage: 2 bits/weight or base-3 1.6 bits/weight (default: 2bit)")
    z.add_argument("--granularity", default="per_tensor", choices=["per_tensor", "per_channel", "per_group"],
                   help="one scale per tensor (BitNet, default), per output channel, or per group")
    z.add_argument("--group-size", type=int, default=128, help="weights per scale with per_group (default: 128)")
    z.add_argument("--scale-mode", default="absmean", choices=["absmean", "fit"])
    z.add_argument("--act-bits", type=int, default=8, choices=[8, 4, 16],
                   help="activations: 8 = per-token int8, integer kernel (W1.58A8, default); 4 = int4; "
                        "16 = float (W1.58A16)")
    z.add_argument("--float-dtype", default="fp16", choices=["fp32", "fp16", "bf16"],
                   help="storage of embeddings, LM head and norms in the file (default: fp16)")
    z.add_argument("--include", nargs="*", help="fnmatch patterns of module names to quantize")
    z.add_argument("--exclude", nargs="*", help="fnmatch patterns of module names to keep")
    z.add_argument("--gguf-file", default=None, help="GGUF file inside the model dir to load (dequantized)")
    z.add_argument("--random-init", action="store_true", help="random weights from the model's config")
    z.set_defaults(fn=cmd_quantize)

    # export
    x = sub.add_parser("export", help="export a ternlm checkpoint to GGUF for llama.cpp",
                       description="Write a ternlm checkpoint as a GGUF file (GPT-2 and Llama architectures) whose "
                                   "ternary layers use llama.cpp's TQ2_0 or TQ1_0 types.")
    x.add_argument("model", help="ternlm checkpoint directory")
    x.add_argument("--format", default="gguf", help="output format (gguf)")
    x.add_argument("--type", default="tq2_0", choices=["tq2_0", "tq1_0"],
                   help="ternary block type: tq2_0 (2.06 bits/weight) or tq1_0 (1.69) (default: tq2_0)")
    x.add_argument("--head-dtype", default="f16", choices=["f16", "f32", "q8_0"],
                   help="storage of embeddings / LM head / other 2-D float tensors (default: f16)")
    x.add_argument("-o", "--out", required=True, help="GGUF file to write")
    x.set_defaults(fn=cmd_export)

    # bench
    from ternlm.bench import add_arguments

    b = sub.add_parser("bench", help="decode/prefill tok/s vs HF transformers and llama.cpp on a GPT-2-small shape",
                       description="Same model, same threads, every system in its own process: decode and prefill "
                                   "tok/s, file bytes, peak RSS, achieved GB/s vs copy bandwidth.")
    add_arguments(b)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    from ternlm.errors import TernlmError

    args = build_parser().parse_args(argv)
    debug = os.environ.get("TERNLM_DEBUG") == "1"
    try:
        return args.fn(args)
    except TernlmError as e:
        if debug:
            raise
        print(f"ternlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ternlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still ends in one line
        if debug:
            raise
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"ternlm: error: {type(e).__name__}: {msg} (set TERNLM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
