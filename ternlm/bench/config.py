"""What a benchmark run measures: systems, variants, sizes (``BenchConfig``), and its command line."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import asdict, dataclass, field, fields

from ternlm.config import FORMATS, HEADS
from ternlm.errors import TernlmError

# ternlm variants: activation path, packed format, LM-head storage
TERNLM_VARIANTS = ("a8-2bit-fp32", "a8-2bit-int8", "a8-2bit-fp16", "a16-2bit-int8", "a8-base3-int8")
HF_VARIANTS = ("fp32", "bf16")
# llama.cpp files: ternary TQ2_0 blocks with an f16 or q8_0 head/embedding, and all-f16
LLAMA_VARIANTS = ("tq2_0-f16", "tq2_0-q8_0", "f16")
# which llama.cpp file has the same LM-head precision as a ternlm head
SAME_HEAD = {"fp16": "tq2_0-f16", "int8": "tq2_0-q8_0"}  # fp32 / bf16 heads have no llama.cpp twin here
# the peer's interpreter and converter, as scripts/setup_llama_peer.sh builds them (or set the variables)
DEFAULT_LLAMA_PYTHON = os.environ.get("TERNLM_LLAMA_PYTHON", ".venv-llama/bin/python")
DEFAULT_CONVERT_SCRIPT = ".venv-llama/llama.cpp/convert_hf_to_gguf.py"
# llama.cpp's own timing tool (setup_llama_peer.sh builds it); used when present, "off" skips it
DEFAULT_LLAMA_BENCH = os.environ.get("TERNLM_LLAMA_BENCH", ".venv-llama/tools/llama-bench")


@dataclass
class BenchConfig:
    model_config: str = field(default_factory=lambda: os.path.join(
        os.environ.get("TERNLM_DATA_DIR", "../shared/data"), "gpt2-tokenizer"))
    prompt_tokens: int = 16
    new_tokens: int = 128
    threads: int = 2
    repeats: int = 3
    rounds: int = 1                   # round-robin passes over every system; best of all is kept
    systems: tuple = ("ternlm", "hf", "llama_cpp")
    ternlm_variants: tuple = TERNLM_VARIANTS
    hf_variants: tuple = HF_VARIANTS
    llama_variants: tuple = LLAMA_VARIANTS
    gelu: str = "tanh"                # runtime GELU (see ternlm.runtime.gpt2.RuntimeConfig)
    llama_python: str | None = None   # default: this interpreter if it imports llama_cpp, else DEFAULT_LLAMA_PYTHON
    overrides: dict = field(default_factory=dict)  # GPT2Config fields (tests shrink the model)
    workdir: str | None = None        # keep model files here (default: a temporary directory)
    json: str | None = None
    profile: bool = True              # per-component decode breakdown for the first ternlm variant
    seed: int = 0
    model: str | None = None          # benchmark this model (any directory ternlm.load reads) instead of the synthetic GPT-2
    llama_gguf: tuple = ()            # GGUF files llama.cpp also runs, one row each named after the file stem
    llama_bench: str | None = None    # llama-bench binary (default: DEFAULT_LLAMA_BENCH when present; "off": none)

    def __post_init__(self):
        self.systems = tuple(self.systems)
        self.ternlm_variants = tuple(self.ternlm_variants)
        self.hf_variants = tuple(self.hf_variants)
        self.llama_variants = tuple(self.llama_variants)
        self.llama_gguf = (self.llama_gguf,) if isinstance(self.llama_gguf, str) else tuple(self.llama_gguf or ())
        for s in self.systems:
            if s not in ("ternlm", "hf", "llama_cpp"):
                raise TernlmError(f"unknown system {s!r}; choose ternlm, hf, llama_cpp")
        for v in self.ternlm_variants:
            parse_variant(v)
        if not set(self.hf_variants) <= set(HF_VARIANTS):
            raise TernlmError(f"hf variants are {HF_VARIANTS}")
        if not set(self.llama_variants) <= set(LLAMA_VARIANTS):
            raise TernlmError(f"llama.cpp variants are {LLAMA_VARIANTS}")
        if self.model is not None and not os.path.exists(self.model):
            raise TernlmError(f"--model {self.model}: no such directory")
        for g in self.llama_gguf:
            if not os.path.isfile(g):
                raise TernlmError(f"--llama-gguf {g}: no such file")
        stems = [gguf_name(g) for g in self.llama_gguf]
        dup = sorted({s for s in stems if stems.count(s) > 1 or (self.model is None and s in self.llama_variants)})
        if dup:
            raise TernlmError(f"--llama-gguf rows are named after the file stem, and {', '.join(dup)} is taken twice; "
                              "rename a file")
        if self.llama_bench not in (None, "off") and not os.path.isfile(self.llama_bench):
            raise TernlmError(f"--llama-bench {self.llama_bench}: no such file (scripts/setup_llama_peer.sh builds it "
                              "into .venv-llama/tools/)")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.threads < 1 or self.repeats < 1 or self.rounds < 1:
            raise TernlmError("prompt_tokens >= 1, new_tokens >= 2, threads >= 1, repeats >= 1, rounds >= 1 "
                              "are required")

    def to_dict(self) -> dict:
        return asdict(self)


def gguf_name(path: str) -> str:
    """The row name of a ``--llama-gguf`` file: its stem (``runs/llama/Q2_K.gguf`` -> ``Q2_K``)."""
    return os.path.splitext(os.path.basename(path))[0]


def llama_bench_tool(cfg: BenchConfig) -> tuple[str | None, str]:
    """(llama-bench binary, why not): the named one, else DEFAULT_LLAMA_BENCH when it is there."""
    if cfg.llama_bench == "off":
        return None, "--llama-bench off"
    path = cfg.llama_bench or DEFAULT_LLAMA_BENCH
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path, ""
    return None, f"{path} not found (scripts/setup_llama_peer.sh builds it; or --llama-bench PATH)"


def parse_variant(v: str) -> tuple:
    try:
        act, fmt, head = v.split("-")
    except ValueError:
        raise TernlmError(f"ternlm variant {v!r} must read ACT-FORMAT-HEAD, e.g. a8-2bit-int8") from None
    if act not in ("a8", "a16") or fmt not in FORMATS or head not in HEADS:
        raise TernlmError(f"bad ternlm variant {v!r}: act a8|a16, format {'|'.join(FORMATS)}, head {'|'.join(HEADS)}")
    return (8 if act == "a8" else None), fmt, head


def bench_command(cfg: BenchConfig) -> str:
    d = BenchConfig()
    args = []
    for f in fields(BenchConfig):
        v = getattr(cfg, f.name)
        if v == getattr(d, f.name) or f.name in ("overrides",):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "llama_gguf":  # repeatable
            for g in v:
                args += [flag, g]
        elif isinstance(v, tuple):
            args += [flag, ",".join(v)]
        elif isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return " ".join(["ternlm bench", *map(shlex.quote, args)])


_HELP = {
    "model_config": "GPT-2 config (+ tokenizer) directory or hub id giving the model's shape",
    "prompt_tokens": "prompt length (default: 16)",
    "new_tokens": "greedy tokens decoded per run (default: 128)",
    "threads": "threads for every system (default: 2)",
    "repeats": "runs per system and round; the best is reported (default: 3)",
    "rounds": "round-robin passes over all systems, so load drift on a shared machine hits all alike (default: 1)",
    "systems": "comma-separated: ternlm,hf,llama_cpp",
    "ternlm_variants": f"comma-separated ACT-FORMAT-HEAD (default: {','.join(TERNLM_VARIANTS)})",
    "hf_variants": "comma-separated: fp32,bf16",
    "llama_variants": f"comma-separated: {','.join(LLAMA_VARIANTS)}",
    "gelu": "runtime GELU: tanh (fused) or model (HF's op for op)",
    "llama_python": "interpreter that imports llama_cpp (default: this one, else the benchmark venv)",
    "workdir": "keep the model files here (default: a temporary directory)",
    "json": "also write the results as JSON here",
    "profile": "per-component decode profile of the first ternlm variant",
    "seed": "random seed of the model weights and the prompt",
    "model": "benchmark this model directory (ternlm checkpoint, GGUF dir, HF dir) on the decode engine (one row "
             "per LM-head storage in --ternlm-variants) against HF generate on the same model",
    "llama_gguf": "a GGUF file llama.cpp also runs, as its own row named after the file stem; repeatable (e.g. the "
                  "shipped Q4_1 file, ternlm's export, or a Q2_K / IQ2_M file of similar bytes from "
                  "scripts/llama_quants.py)",
    "llama_bench": "llama.cpp's llama-bench binary: each GGUF also timed by llama.cpp itself, without the Python "
                   "bindings' per-token overhead (default: $TERNLM_LLAMA_BENCH or .venv-llama/tools/llama-bench "
                   "when present; off: skip)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The BenchConfig fields as command-line flags (shared by ``ternlm bench`` and ``-m ternlm.bench``)."""
    for f in fields(BenchConfig):
        if f.name == "overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        h = _HELP.get(f.name)
        if f.name == "llama_gguf":
            p.add_argument(flag, dest=f.name, action="append", metavar="PATH", help=h)
        elif f.type == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.type in ("int",):
            p.add_argument(flag, dest=f.name, type=int, help=h)
        else:
            p.add_argument(flag, dest=f.name, help=h)
    p.add_argument("--kernels", action="store_true",
                   help="also run the kernel micro-benchmark (GPT-2 shapes, batch 1 and 512, vs torch fp32)")
