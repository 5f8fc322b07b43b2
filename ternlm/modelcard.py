"""Model cards: the README.md written beside every ternlm checkpoint.

    from ternlm.modelcard import source_info, write_model_card
    write_model_card("runs/smol-ternary", method="absmean PTQ", settings=cfg.to_dict(),
                     **source_info("../shared/data/smollm2-135m"))

A card has Hugging Face metadata (base model when it is a hub id, ``library_name: ternlm``, tags,
the license carried from the source when known) and the facts: method and settings, bits per
weight counting the scales, the verification of the saved file (ternary %, zeros %), whatever
numbers were measured, how to load and run it (ternlm, and llama.cpp after a GGUF export), and the
limitations. Every number in it is read from the checkpoint or passed in by the caller; nothing
is estimated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ternlm.errors import TernlmError

CARD_FILE = "README.md"
BASE_TAGS = ("ternlm", "ternary", "1.58-bit", "bitnet", "quantized")


def _gguf_string(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        v = f.contents()
    except Exception:  # older gguf: the string is the last part
        try:
            v = bytes(f.parts[f.data[0]]).decode("utf-8")
        except Exception:
            return None
    return v if isinstance(v, str) and v.strip() else None


def _front_matter(readme: Path) -> dict:
    """The ``key: value`` lines of a README's YAML front matter (scalars only)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    out = {}
    for line in m.group(1).splitlines():
        k, sep, v = line.partition(":")
        if sep and not line.startswith((" ", "-")) and v.strip():
            out[k.strip()] = v.strip().strip("'\"")
    return out


def source_info(source, gguf_file: str | None = None) -> dict:
    """What a card can carry from the model a checkpoint came from: ``base_model`` (a hub id, or
    None for a local source without one), ``license`` and ``name`` when the source states them.

    Reads GGUF metadata (``general.license``, ``general.name``, ``general.base_model.0.repo_url``),
    a Hugging Face directory's README front matter, or takes a hub id as the base model.
    """
    from ternlm.data.text import looks_like_hub_id

    info: dict = {"base_model": None, "license": None, "name": None}
    p = Path(str(source)).expanduser()
    if not p.exists():
        if looks_like_hub_id(str(source)):
            info["base_model"] = info["name"] = str(source)
        return info
    gguf_path = None
    if p.is_file() and p.suffix.lower() == ".gguf":
        gguf_path = p
    elif p.is_dir():
        ggufs = [p / gguf_file] if gguf_file else sorted(p.glob("*.gguf"))
        gguf_path = ggufs[0] if len(ggufs) == 1 and ggufs[0].is_file() else None
        fm = _front_matter(p / CARD_FILE)
        info["license"] = fm.get("license")
        if fm.get("base_model"):
            info["base_model"] = fm["base_model"]
        cfg = p / "config.json"
        if cfg.is_file() and not info["name"]:
            try:
                name = json.loads(cfg.read_text()).get("_name_or_path")
            except (OSError, json.JSONDecodeError):
                name = None
            if name and looks_like_hub_id(name):
                info["name"] = name
    if gguf_path is not None:
        try:
            import gguf

            reader = gguf.GGUFReader(str(gguf_path))
        except Exception:
            return info
        info["license"] = info["license"] or _gguf_string(reader, "general.license")
        info["name"] = _gguf_string(reader, "general.name") or info["name"]
        url = _gguf_string(reader, "general.base_model.0.repo_url") or _gguf_string(reader, "general.source.url")
        m = re.match(r"https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$", url or "")
        if m and not info["base_model"]:
            info["base_model"] = m.group(1)
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "-"
    return "-" if v is None else str(v)


def _usage(gguf_file: str | None) -> list[str]:
    """How to load and run it: the checkpoint directory with ternlm (and llama.cpp after an export),
    or a GGUF file with llama.cpp first."""
    prompt = '"The capital of France is"'
    if gguf_file:
        return ["", "## How to use", "", "```bash",
                f"llama-cli -m {gguf_file} -p {prompt} -n 20",
                f"ternlm generate --model {gguf_file} --prompt {prompt}",
                f"ternlm eval {gguf_file} --text wikitext --max-windows 10", "```", "",
                "```python", "import ternlm", "",
                f'model, tokenizer = ternlm.load("{gguf_file}")  # packed ternary layers, as in the file', "```"]
    return ["", "## How to use", "", "```python", "import ternlm", "",
            'model, tokenizer = ternlm.load("path/to/this/directory")',
            f"ids = tokenizer({prompt}, return_tensors=\"pt\").input_ids",
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))", "```", "",
            "```bash",
            f"ternlm generate --model path/to/this/directory --prompt {prompt}",
            "ternlm eval path/to/this/directory --text wikitext --max-windows 10",
            "ternlm verify path/to/this/directory",
            "# llama.cpp: export to GGUF (TQ2_0 / TQ1_0 ternary blocks), then run it there",
            "ternlm export path/to/this/directory --type tq2_0 -o model.gguf",
            f"llama-cli -m model.gguf -p {prompt} -n 20", "```"]


def render_model_card(*, model_type: str, record: dict, totals: dict | None, method: str,
                      settings: dict | None = None, metrics: dict | None = None, base_model: str | None = None,
                      license: str | None = None, tags=(), name: str = "model", extra_files: dict | None = None,
                      limitations=(), gguf_file: str | None = None) -> str:
    """The card's markdown from facts already gathered (``write_model_card`` gathers them).
    ``gguf_file``: the card describes that GGUF export (usage with llama.cpp first)."""
    meta = ["---"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta.append("library_name: ternlm")
    if license:
        meta.append(f"license: {license}")
    meta.append("pipeline_tag: text-generation")
    meta.append("tags:")
    meta += [f"- {t}" for t in dict.fromkeys((*BASE_TAGS, *tags))]
    meta.append("---")

    act = "float (W1.58A16)" if record["act_bits"] is None else f"int{record['act_bits']} per token (W1.58A{record['act_bits']})"
    gran = record["granularity"] + (f" (group size {record['group_size']})" if record["granularity"] == "per_group" else "")
    lines = [*meta, "", f"# {name} (ternary, 1.58-bit)", ""]
    lines.append(f"A {model_type} causal language model whose {len(record['targets'])} transformer-block linear layers "
                 f"hold ternary weights {{-1, 0, +1}} x scale, packed as real integers ({record['fmt']}), written by "
                 f"ternlm {record.get('ternlm_version', '')}."
                 + (f" Base model: `{base_model}`." if base_model else ""))
    lines += ["", "## Method", "", method, "",
              "| setting | value |", "|---|---|",
              f"| ternary layers | {len(record['targets'])} |",
              f"| scales | {gran}, float32 |",
              f"| packed format | {record['fmt']} |",
              f"| activations | {act} |"]
    for k, v in (settings or {}).items():
        lines.append(f"| {k} | {_fmt(v)} |")
    if totals:
        lines += ["", "## Size and verification", "",
                  "Checked on the saved file (`ternlm verify`): every weight of every ternary layer is 0 or +-s "
                  "with s its group's scale.", "",
                  "| | |", "|---|---|",
                  f"| ternary weights | {totals['n_weights']:,} in {totals['n_layers']} layers |",
                  f"| ternary share | {100 * totals['ternary_share']:.2f}% |",
                  f"| zeros | {100 * totals['zeros_share']:.2f}% |",
                  f"| bits per weight, counting scales | {totals['bits_per_weight']:.3f} (information), "
                  f"{totals['storage_bits_per_weight']:.3f} (as stored) |",
                  f"| verification | {'all layers ternary' if totals['ok'] else 'FAILED'} |"]
    if metrics:
        lines += ["", "## Measured", "", "| measurement | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    lines += _usage(gguf_file)
    if extra_files:
        lines += ["", "## Files", ""] + [f"- `{k}`: {v}" for k, v in extra_files.items()]
    lims = [
        "Ternary weights lose quality against the full-precision model; compare the perplexities above "
        "before relying on it, and measure on your own task.",
        "Embeddings, the LM head and norms stay in float; only the transformer-block linear layers are ternary.",
        "The numbers above come from the stated evaluation text and window count only; they are not a "
        "benchmark suite.",
        "The llama.cpp export supports GPT-2 and Llama architectures; llama.cpp's TQ types need scales in "
        "groups of 256 weights (per tensor or per channel scales, or per-group scales whose groups fit).",
    ] + list(limitations)
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in lims]
    return "\n".join(lines) + "\n"


def _checkpoint_facts(d: Path) -> tuple[dict, str]:
    """A checkpoint directory's quantization record and model type."""
    from ternlm.checkpoint import read_record

    rec = read_record(d)
    try:
        model_type = json.loads((d / "config.json").read_text()).get("model_type", "?")
    except (OSError, json.JSONDecodeError):
        raise TernlmError(f"cannot read {d / 'config.json'}") from None
    return rec, model_type


def write_model_card(directory, *, method: str, settings: dict | None = None, metrics: dict | None = None,
                     base_model: str | None = None, license: str | None = None, tags=(), name: str | None = None,
                     extra_files: dict | None = None, limitations=(), verify: bool = True) -> Path:
    """Write ``README.md`` into a ternlm checkpoint directory (atomically) and return its path.

    The quantization record and the architecture are read from the directory; with ``verify`` the
    saved model is read layer by layer and checked (``ternlm.nn.verify``) for the ternary and zeros shares and
    the bits per weight counting scales.
    """
    from ternlm.checkpoint import verify_checkpoint
    from ternlm.fileio import atomic_write_text

    d = Path(directory).expanduser()
    rec, model_type = _checkpoint_facts(d)
    totals = None
    if verify:
        totals = verify_checkpoint(d, rec["targets"]).totals()
    text = render_model_card(model_type=model_type, record=rec, totals=totals, method=method, settings=settings,
                             metrics=metrics, base_model=base_model, license=license, tags=tags,
                             name=name or (base_model.split("/")[-1] if base_model else d.name),
                             extra_files=extra_files, limitations=limitations)
    path = d / CARD_FILE
    atomic_write_text(path, text)
    return path


def gguf_card_path(gguf_path) -> Path:
    """Where the card of an exported GGUF goes: ``README.md`` beside it, unless that file exists and
    is not this GGUF's card (a checkpoint's card, the user's own file), then ``<stem>.README.md``."""
    g = Path(gguf_path)
    readme = g.parent / CARD_FILE
    if not readme.exists():
        return readme
    try:
        mine = f"llama-cli -m {g.name} " in readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        mine = False
    return readme if mine else g.with_name(f"{g.stem}.{CARD_FILE}")


def write_gguf_card(gguf_path, source_dir, *, qtype: str, head_dtype: str) -> Path:
    """Write the model card of a GGUF file exported from the ternlm checkpoint ``source_dir``
    (atomically; see ``gguf_card_path`` for where). Sizes and bits per weight are read from the file."""
    import gguf

    from ternlm.fileio import atomic_write_text

    g = Path(gguf_path)
    d = Path(source_dir).expanduser()
    rec, model_type = _checkpoint_facts(d)
    reader = gguf.GGUFReader(str(g))
    qt = gguf.GGMLQuantizationType[qtype.upper()]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n_all = sum(int(t.n_elements) for t in reader.tensors)
    n_tern = sum(int(t.n_elements) for t in reader.tensors if t.tensor_type == qt)
    size = g.stat().st_size
    info = source_info(d)
    metrics = {"file size (MB)": round(size / 1e6, 2),
               f"bits per ternary weight ({qtype.upper()} blocks of {block}, fp16 block scale)": 8 * type_size / block,
               "ternary weights in the file": f"{n_tern:,} of {n_all:,}",
               "bits per parameter, whole file": round(8 * size / max(n_all, 1), 3)}
    settings = {"GGUF type of the ternary layers": qtype.upper(),
                "embeddings / LM head / other 2-D float tensors": head_dtype, "source checkpoint": str(d)}
    text = render_model_card(
        model_type=model_type, record=rec, totals=None,
        method=f"GGUF export of the ternlm checkpoint `{d}` (its README.md says how that checkpoint was made). "
               f"Ternary layers are re-blocked as llama.cpp {qtype.upper()}: one fp16 scale per {block} weights, "
               "taken from the checkpoint's scales.",
        settings=settings, metrics=metrics, base_model=info.get("base_model"), license=info.get("license"),
        tags=("gguf", "llama.cpp"), name=g.stem, gguf_file=g.name,
        limitations=("llama.cpp runs the TQ types with int8 activations; a W1.58A16 checkpoint therefore runs "
                     "slightly differently there than in ternlm.",))
    path = gguf_card_path(g)
    atomic_write_text(path, text)
    return path
