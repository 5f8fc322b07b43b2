"""ternlm as an lm-eval-harness model, registered under the name ``ternlm``.

From Python (any task lm-eval knows, any model ``ternlm.load`` reads):

    import lm_eval
    from ternlm.eval.harness import TernlmLM
    lm_eval.simple_evaluate(model=TernlmLM(pretrained="runs/smol-ptb"), tasks=["hellaswag"])

From the command line, ``ternlm lm-eval`` is lm-eval's own command with this model registered
(lm-eval 0.4 finds models only in its built-in list, so its plain ``lm_eval`` command cannot see
a model that another package defines):

    ternlm lm-eval --model ternlm --model_args pretrained=runs/smol-ptb --tasks hellaswag

Scoring goes through ``ternlm.eval.loglik.LoglikScorer``, the scorer of ``ternlm eval --tasks``,
so both give the same numbers on the same documents. lm-eval does the tokenization of requests
(its ``TemplateLM`` rules, which the scorer follows as well).
"""

from __future__ import annotations

import sys

from ternlm.errors import TernlmError

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: its registry fills
    # itself only while empty, so registering ours first would hide "hf" and the rest)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional dependency: say how to get it
    raise TernlmError("lm-eval-harness is not installed: pip install 'ternlm[eval]' (or pip install lm-eval)") from e


def _as_int(v, name: str) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise TernlmError(f"{name} must be an integer, got {v!r}") from None


@register_model("ternlm")
class TernlmLM(TemplateLM):
    """``pretrained``: anything ``ternlm.load`` reads (ternlm checkpoint, GGUF file, HF directory, hub
    id); or pass a loaded ``model`` and ``tokenizer``. ``quant``: quantize a float model in memory
    first (``ternlm eval --quant``). ``batch_tokens`` and ``max_length`` as in ``LoglikScorer``;
    ``max_gen_toks``: default length for generation requests. lm-eval's ``batch_size`` and
    ``device`` arguments are accepted; batches are sized in tokens instead."""

    def __init__(self, pretrained=None, *, model=None, tokenizer=None, gguf_file=None, quant=None, batch_tokens=2048,
                 max_length=None, max_gen_toks=256, device=None, batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        from ternlm.eval.loglik import LoglikScorer

        if unused:
            raise TernlmError(f"unknown ternlm model_args: {', '.join(sorted(unused))}")
        if model is None:
            if pretrained is None:
                raise TernlmError("the ternlm lm-eval model needs pretrained=PATH (or model= and tokenizer=)")
            from ternlm.models.loading import load

            model, tokenizer = load(pretrained, gguf_file=gguf_file)
            if quant:
                from ternlm.eval.run import quantize_in_memory

                model = quantize_in_memory(model, quant)
        if tokenizer is None:
            raise TernlmError(f"no tokenizer for {pretrained or type(model).__name__}")
        if device not in (None, "", "cpu"):
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else type(model).__name__
        self.scorer = LoglikScorer(model, tokenizer, max_length=_as_int(max_length, "max_length"),
                                   batch_tokens=_as_int(batch_tokens, "batch_tokens") or 2048)
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks") or 256
        self._device = device or "cpu"

    # -- what TemplateLM needs -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise TernlmError("the tokenizer has no EOS token")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "ternlm").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens:
            return list(self.tokenizer(string, add_special_tokens=True)["input_ids"])
        return self.scorer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm,
                                                desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests], progress=not disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the request asks) continuations, cut at the first stop string."""
        import torch
        from tqdm.auto import tqdm

        from ternlm.eval.classification import model_device

        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            ids = self.tok_encode(context)[-(self.max_length - max_new):] if max_new < self.max_length else \
                self.tok_encode(context)[-1:]
            with torch.inference_mode():
                gen = self.model.generate(torch.tensor([ids], device=model_device(self.model)), max_new_tokens=max_new,
                                          do_sample=do_sample and temperature > 0,
                                          temperature=temperature if do_sample and temperature > 0 else None,
                                          top_p=None, top_k=None,
                                          pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
            text = self.tok_decode(gen[0, len(ids):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> int:
    """``ternlm lm-eval ARGS``: lm-eval's command line with the ``ternlm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *(argv if argv is not None else saved[1:])]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
