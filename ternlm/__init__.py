"""ternlm: 1.58-bit ternary language models.

Nothing heavy is imported at package import time; the public API is loaded lazily.
"""

__version__ = "0.1.0"

_LAZY = {
    "TernaryConfig": "ternlm.config",
    "Int8Config": "ternlm.config",
    "LLMInt8Config": "ternlm.config",
    "QuantConfig": "ternlm.config",
    "TernlmError": "ternlm.errors",
    "quantize_model": "ternlm.nn.surgery",
    "verify": "ternlm.nn.verify",
    "BitLinear": "ternlm.nn.bitlinear",
    "run_pipeline": "ternlm.pipeline",
    "PipelineConfig": "ternlm.pipeline",
    "ternarize": "ternlm.quant.ternary",
    "dequantize_ternary": "ternlm.quant.ternary",
    "load_sms_spam": "ternlm.data.sms",
    "split_dataset": "ternlm.data.sms",
    "load_text": "ternlm.data.text",
    "load": "ternlm.models.loading",
    "from_pretrained": "ternlm.models.loading",  # deprecated alias: ternlm.load(path).model
    "source_kind": "ternlm.models.loading",
    "load_tokenizer": "ternlm.models.sources",
    "save_model": "ternlm.checkpoint",
    "evaluate_classifier": "ternlm.eval.classification",
    "perplexity": "ternlm.eval.perplexity",
    "train_classifier": "ternlm.train.classify",
    "ClassifierTrainConfig": "ternlm.train.classify",
    "train_lm": "ternlm.train.lm",
    "LMTrainConfig": "ternlm.train.lm",
    "TernaryLinear": "ternlm.nn.ternary_linear",
    "convert": "ternlm.conversion",
    "save_pretrained": "ternlm.checkpoint",
    "quantize": "ternlm.quantization",
    "QuantizeConfig": "ternlm.quantization",
    "evaluate": "ternlm.eval.perplexity",
    "EvalConfig": "ternlm.eval.perplexity",
    "evaluate_model": "ternlm.eval.run",
    "evaluate_zeroshot": "ternlm.eval.zeroshot",
    "ZeroShotConfig": "ternlm.eval.zeroshot",
    "LoglikScorer": "ternlm.eval.loglik",
    "export_gguf": "ternlm.export.gguf",
    "distill": "ternlm.train.distill",
    "DistillConfig": "ternlm.train.distill",
    "write_model_card": "ternlm.modelcard",
    "prepare_data": "ternlm.data.shards",
    "PrepareConfig": "ternlm.data.shards",
    "TrainConfig": "ternlm.train.scratch",
    "compare": "ternlm.train.compare",
    "CompareConfig": "ternlm.train.compare",
    "add_knowledge_tokens": "ternlm.nn.knowledge",
    "DecodeEngine": "ternlm.runtime.engine",
    "GPT2Runtime": "ternlm.runtime.engine",
    "RuntimeConfig": "ternlm.runtime.engine",
}


from ternlm._lazy import lazy_exports  # noqa: E402

__getattr__, __all__ = lazy_exports("ternlm", _LAZY)
__all__ = __all__ + ["__version__"]

