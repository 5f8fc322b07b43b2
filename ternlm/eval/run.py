"""``ternlm eval``: one model, loaded once, scored on a text (perplexity) and/or zero-shot tasks.

    from ternlm.eval.run import evaluate_model
    from ternlm.eval.zeroshot import ZeroShotConfig
    res = evaluate_model("runs/smol-ptb", text="../shared/data/wikitext-2/wiki.test.raw",
                         zeroshot=ZeroShotConfig(tasks="all", limit=500, tasks_dir="../shared/data/zeroshot"))

Every input (text file, task names and files, the JSON destination, the in-memory quantizer) is
checked before the model loads. ``quant`` quantizes a float model in memory first (the int8
baselines, LLM.int8, absmean ternary), so that methods with no file format are scored by the
same code as the files.
"""

from __future__ import annotations

import time
from pathlib import Path

from ternlm.errors import TernlmError
from ternlm.eval.perplexity import EvalConfig
from ternlm.eval.zeroshot import ZeroShotConfig

QUANT_METHODS = ("int8_absmax", "int8_zeropoint", "llm_int8", "absmean")


def quantize_in_memory(model, method: str):
    from ternlm.config import QuantConfig, TernaryConfig, method_config
    from ternlm.nn.surgery import quantize_model

    weights = TernaryConfig() if method == "absmean" else method_config(method)
    return quantize_model(model, QuantConfig(weights=weights))


def evaluate_model(model_source, *, text=None, ppl: EvalConfig | None = None, zeroshot: ZeroShotConfig | None = None,
                   quant: str | None = None, gguf_file: str | None = None, json_out: str | Path | None = None,
                   progress: bool = True, log=print) -> dict:
    """Perplexity on ``text`` (with ``ppl``'s protocol) and/or zero-shot metrics (``zeroshot``) of the
    model at ``model_source`` (anything ``ternlm.load`` reads). Returns one dict; ``json_out`` gets it too."""
    from ternlm.data.text import check_source, load_text
    from ternlm.eval.perplexity import perplexity
    from ternlm.eval.zeroshot import describe_model, evaluate_zeroshot
    from ternlm.fileio import check_output_file, save_json
    from ternlm.models.loading import load, source_kind

    if text is None and zeroshot is None:
        raise TernlmError("nothing to evaluate: give --text FILE (perplexity) and/or --tasks NAMES (zero-shot)")
    if quant is not None and quant not in QUANT_METHODS:
        raise TernlmError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_METHODS)}")
    ppl = ppl or EvalConfig()
    if text is not None:
        check_source(text, "text file")
    if zeroshot is not None:
        zeroshot.check()
    if json_out is not None:
        check_output_file(json_out)
    kind = source_kind(model_source, gguf_file)
    if quant is not None and kind in ("ternlm", "ternlm-gguf"):
        raise TernlmError(f"{model_source} is already ternary; --quant applies to float models")
    text_str = load_text(text, config=ppl.text_config, split=ppl.split) if text is not None else None

    t_load = time.perf_counter()
    model, tok = load(model_source, gguf_file=gguf_file)
    if tok is None:
        raise TernlmError(f"no tokenizer files in {model_source}")
    if quant is not None:
        model = quantize_in_memory(model, quant)
    out: dict = {"model": str(model_source), "model_kind": kind, "quant": quant, "precision": describe_model(model),
                 "load_seconds": time.perf_counter() - t_load}
    if text_str is not None:
        t0 = time.perf_counter()
        res = perplexity(model, tok, text_str, max_length=ppl.window, stride=ppl.stride, max_windows=ppl.max_windows,
                         batch_size=ppl.batch_size, progress=progress)
        res.update(seconds=time.perf_counter() - t0, text=str(text), protocol=ppl.to_dict())
        out["perplexity"] = res
    if zeroshot is not None:
        out["zeroshot"] = evaluate_zeroshot(model, tok, zeroshot, progress=progress, log=log)
    if json_out is not None:
        save_json(out, json_out)
    return out
