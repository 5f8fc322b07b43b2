"""Knowledge tokens: K learned full-precision vectors prepended to every sequence.

They enter after the token embedding, are seen by every position under the causal mask, are never
ternarized and never predicted (no loss). K = 1 is the learned attention sink.

Positions (the text never moves)::

    GPT-2 (learned positions)  knowledge: no position embedding   text: 0 .. T-1
    Llama (RoPE)               knowledge: -K .. -1                 text: 0 .. T-1

so a model trained with knowledge tokens keeps its whole ``n_positions`` for text and a text
token sees the knowledge tokens at the same relative offsets in training and at inference.

How: two hooks on the Hugging Face base model (``GPT2Model`` / ``LlamaModel``), so the unchanged
HF ``forward``, ``generate``, perplexity and the trainer all see them:

- training, or any forward with gradients: the K vectors are concatenated in front of the
  text's embeddings and the K outputs are cut off again before the LM head (logits stay
  (B, T, V));
- inference without gradients: the K keys/values of every layer are computed once and copied
  into the cache as a constant prefix; the text then runs as if it followed a K-token prompt.

Saved beside the HF weights as ``ternlm_knowledge.safetensors`` (plain HF loaders ignore it; load
it back with ``load_knowledge``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ternlm.errors import TernlmError

KNOWLEDGE_FILE = "ternlm_knowledge.safetensors"
ATTR = "ternlm_knowledge"
_CACHE_MARK = "_ternlm_knowledge_prefix"


class KnowledgeTokens(nn.Module):
    """(K, d) learned vectors and the hooks that feed them to a HF base model."""

    def __init__(self, k: int, d: int, *, init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        if k < 1:
            raise TernlmError(f"knowledge tokens need K >= 1, got {k}")
        self.vectors = nn.Parameter(torch.randn(k, d, device=device, dtype=dtype) * init_std)
        self._prefix = None        # per-layer (keys, values) of the K tokens, batch 1
        self._strip = False        # the current forward prepended K positions to cut off afterwards
        self._computing = False    # computing the prefix: hooks pass through
        self._handles = []
        self._base = None
        self._kind = None

    @property
    def k(self) -> int:
        return self.vectors.shape[0]

    # -- the inputs of the K positions ------------------------------------------------------------

    def _embeds_and_positions(self, base: nn.Module, batch: int):
        """(B, K, d) inputs and (B, K) position ids of the knowledge positions."""
        v = self.vectors
        if self._kind == "gpt2":
            # NOTE: GPT-2 adds wpe[position] to every input; give the K tokens position 0 and subtract
            # wpe[0] here, so their input is exactly the learned vector (and wpe[0] gets no gradient
            # from them: the two terms cancel).
            v = v - base.wpe.weight[0]
            pos = torch.zeros(self.k, dtype=torch.long, device=v.device)
        else:
            pos = torch.arange(-self.k, 0, dtype=torch.long, device=v.device)
        return v.unsqueeze(0).expand(batch, -1, -1), pos.unsqueeze(0).expand(batch, -1)

    @torch.no_grad()
    def prefix(self, base: nn.Module):
        """Per-layer (keys, values) of the knowledge tokens, computed once (batch 1)."""
        if self._prefix is None:
            emb, pos = self._embeds_and_positions(base, 1)
            self._computing = True
            try:
                out = base(inputs_embeds=emb, position_ids=pos, use_cache=True,
                           attention_mask=torch.ones(1, self.k, dtype=torch.long, device=emb.device))
            finally:
                self._computing = False
            self._prefix = [(layer.keys.clone(), layer.values.clone()) for layer in out.cache.layers]
        return self._prefix

    def invalidate(self) -> None:
        """Forget the cached prefix (the weights changed)."""
        self._prefix = None

    # -- hooks ------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        base = model.base_model
        kind = getattr(model.config, "model_type", None)
        if kind not in ("gpt2", "llama"):
            raise TernlmError(f"knowledge tokens support GPT-2 and Llama architectures, not {kind!r}")
        self.detach()
        self._base, self._kind = base, kind
        self._handles = [base.register_forward_pre_hook(self._pre, with_kwargs=True),
                         base.register_forward_hook(self._post)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def train(self, mode: bool = True):
        if mode:
            self.invalidate()
        return super().train(mode)

    def _pre(self, base, args, kwargs):
        if self._computing:
            return None
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"] = args[0]
            args = ()
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if emb is None:
            emb = base.get_input_embeddings()(ids)
        B, T = emb.shape[:2]
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise TernlmError("knowledge tokens need a 2-D attention mask (batch, length)")
        pos = kwargs.get("position_ids")
        K = self.k
        self._strip = False
        if past == 0 and (torch.is_grad_enabled() or self.training):
            # Recompute path: [knowledge ; text] in one forward.
            kemb, kpos = self._embeds_and_positions(base, B)
            if pos is None:
                pos = torch.arange(T, device=emb.device).unsqueeze(0).expand(B, -1)
            text_mask = mask if mask is not None else torch.ones(B, T, dtype=torch.long, device=emb.device)
            kwargs.update(input_ids=None, inputs_embeds=torch.cat([kemb.to(emb.dtype), emb], 1),
                          position_ids=torch.cat([kpos, pos.expand(B, -1)], 1),
                          attention_mask=torch.cat([torch.ones(B, K, dtype=text_mask.dtype,
                                                               device=emb.device), text_mask], 1))
            if cache is not None:
                setattr(cache, _CACHE_MARK, K)
            self._strip = True
            return args, kwargs
        if past == 0:
            # Inference: the constant prefix goes into a fresh cache.
            from transformers import DynamicCache

            if cache is None:
                if kwargs.get("use_cache") is False:
                    kwargs["use_cache"] = True  # the prefix lives in the cache
                cache = DynamicCache(config=base.config)
                kwargs["cache"] = cache
            for i, (k, v) in enumerate(self.prefix(base)):
                cache.update(k.expand(B, *k.shape[1:]).to(emb.dtype), v.expand(B, *v.shape[1:]).to(emb.dtype), i)
            setattr(cache, _CACHE_MARK, K)
            past = K
        elif getattr(cache, _CACHE_MARK, None) != K:
            raise TernlmError("this cache was not started by a model with knowledge tokens")
        # Text after a K-long prefix: text positions stay 0.., the mask also covers the prefix.
        if pos is None:
            pos = (torch.arange(T, device=emb.device) + past - K).unsqueeze(0)
        text_mask = mask if mask is not None else torch.ones(B, past - K + T, dtype=torch.long, device=emb.device)
        if text_mask.shape[1] == past - K + T:
            text_mask = torch.cat([torch.ones(B, K, dtype=text_mask.dtype, device=emb.device), text_mask], 1)
        kwargs.update(input_ids=None, inputs_embeds=emb, position_ids=pos, attention_mask=text_mask)
        return args, kwargs

    def _post(self, base, args, out):
        if self._computing or not self._strip:
            return out
        self._strip = False
        out.last_hidden_state = out.last_hidden_state[:, self.k:]
        return out


# ---------------------------------------------------------------------------------------------
# Model-level API


def _embedding_shape(model: nn.Module) -> tuple[int, torch.device, torch.dtype]:
    """(hidden size, device, dtype of the hidden states) from the model's input embedding; an
    embedding over stored rows (int8 / fp16, ``RowEmbedding``) outputs float32."""
    from ternlm.nn.embedding import RowEmbedding

    e = model.get_input_embeddings()
    if isinstance(e, RowEmbedding):
        return e.embedding_dim, e.rows.device, torch.float32
    return e.weight.shape[1], e.weight.device, e.weight.dtype


def add_knowledge_tokens(model: nn.Module, k: int, *, init_std: float = 0.02) -> KnowledgeTokens:
    """Give a HF GPT-2 / Llama causal LM ``k`` knowledge tokens (a submodule ``ternlm_knowledge``)."""
    if get_knowledge(model) is not None:
        raise TernlmError("the model already has knowledge tokens")
    dim, device, dtype = _embedding_shape(model)
    kt = KnowledgeTokens(k, dim, init_std=init_std, device=device, dtype=dtype)
    kt.attach(model)
    model.add_module(ATTR, kt)
    kt.train(model.training)
    return kt


def get_knowledge(model: nn.Module) -> KnowledgeTokens | None:
    m = getattr(model, ATTR, None)
    return m if isinstance(m, KnowledgeTokens) else None


def remove_knowledge(model: nn.Module) -> KnowledgeTokens | None:
    """Take the knowledge tokens off a model (hooks removed); returns them."""
    kt = get_knowledge(model)
    if kt is not None:
        kt.detach()
        delattr(model, ATTR)
    return kt


def restore_knowledge(model: nn.Module, kt: KnowledgeTokens) -> None:
    kt.attach(model)
    model.add_module(ATTR, kt)


def save_knowledge(model: nn.Module, out_dir: str | Path) -> bool:
    """Write ``ternlm_knowledge.safetensors`` into out_dir when the model has knowledge tokens."""
    from safetensors.torch import save_file

    kt = get_knowledge(model)
    if kt is None:
        return False
    save_file({"vectors": kt.vectors.detach().float().contiguous().cpu()}, str(Path(out_dir) / KNOWLEDGE_FILE),
              metadata={"k": str(kt.k), "model_type": str(model.config.model_type)})
    return True


def load_knowledge(model: nn.Module, model_dir: str | Path) -> bool:
    """Attach the knowledge tokens saved in ``model_dir`` (if any) to a loaded model; True when it had some."""
    from safetensors import safe_open

    p = Path(model_dir).expanduser() / KNOWLEDGE_FILE
    if not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            vec = f.get_tensor("vectors")
    except Exception as e:
        raise TernlmError(f"cannot read knowledge tokens from {p}: {str(e).splitlines()[0][:160]}") from None
    dim = _embedding_shape(model)[0]
    if vec.dim() != 2 or vec.shape[1] != dim:
        raise TernlmError(f"{p}: knowledge vectors of shape {tuple(vec.shape)} do not fit hidden size {dim}")
    remove_knowledge(model)
    kt = add_knowledge_tokens(model, vec.shape[0])
    with torch.no_grad():
        kt.vectors.copy_(vec.to(kt.vectors.dtype))
    kt.train(model.training)
    return True


def save_model_with_knowledge(model: nn.Module, tokenizer, out_dir: str | Path, *, packed: bool = False,
                              **save_kwargs) -> Path:
    """Save a (float or converted) model with its knowledge tokens beside the weights.

    The knowledge submodule is taken off for the save so the weights file holds exactly the HF
    architecture's (or ternlm checkpoint's) tensors, then put back.
    """
    kt = remove_knowledge(model)
    try:
        if packed:
            from ternlm.checkpoint import save_pretrained

            out = save_pretrained(model, tokenizer, out_dir, **save_kwargs)
        else:
            from ternlm.checkpoint import save_model

            out = save_model(model, tokenizer, out_dir)
    finally:
        if kt is not None:
            restore_knowledge(model, kt)
    out = Path(out if out is not None else out_dir)
    save_knowledge(model, out)
    return out
