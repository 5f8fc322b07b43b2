import pytest
import torch

from ternlm.errors import TernlmError
from ternlm.nn.knowledge import (KNOWLEDGE_FILE, add_knowledge_tokens, get_knowledge, load_knowledge,
                                 save_model_with_knowledge)

T = 16


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=T,
                                      bos_token_id=None, eos_token_id=None)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=97,
                                        max_position_embeddings=T, bos_token_id=None, eos_token_id=None)).eval()


ARCHS = {"gpt2": _gpt2, "llama": _llama}


@pytest.mark.parametrize("arch", ARCHS)
def test_shape_positions_and_effect(arch):
    model = ARCHS[arch]()
    x = torch.randint(0, 97, (2, T))  # a full-length text: knowledge tokens must not overflow positions
    with torch.no_grad():
        plain = model(input_ids=x).logits
    add_knowledge_tokens(model, 3)
    seen = []
    if arch == "gpt2":
        h = model.transformer.wpe.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    else:
        h = model.model.rotary_emb.register_forward_hook(
            lambda m, a, kw, o: seen.append(kw["position_ids"] if "position_ids" in kw else a[1]), with_kwargs=True)
    with torch.enable_grad():
        out = model(input_ids=x).logits
    h.remove()
    assert out.shape == plain.shape == (2, T, 97)
    pos = seen[0][0].tolist()
    assert pos[3:] == list(range(T))  # the text keeps positions 0..T-1
    assert pos[:3] == ([0, 0, 0] if arch == "gpt2" else [-3, -2, -1])
    assert not torch.allclose(out, plain, atol=1e-4)  # the text sees the knowledge tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_prefix_equals_recompute(arch):
    model = ARCHS[arch]()
    kt = add_knowledge_tokens(model, 4)
    x = torch.randint(0, 97, (2, 10))
    with torch.enable_grad():
        recomputed = model(input_ids=x).logits.detach()
    with torch.no_grad():
        cached = model(input_ids=x).logits
    assert kt._prefix is not None  # the inference path used the constant prefix
    torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)
    # HF generate (prefix in the cache, then one token at a time) matches recomputing every step
    with torch.no_grad():
        g = model.generate(x[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=5,
                           do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.enable_grad():
        full = model(input_ids=g.sequences).logits.detach()
    torch.testing.assert_close(torch.stack(g.scores, 1), full[:, 4:-1], rtol=1e-4, atol=1e-4)


def test_gradients_reach_vectors_not_wpe0():
    model = _gpt2().train()
    kt = add_knowledge_tokens(model, 2)
    x = torch.randint(0, 97, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    assert kt.vectors.grad is not None and kt.vectors.grad.abs().sum() > 0


def test_prefix_refreshes_after_training():
    model = _gpt2()
    kt = add_knowledge_tokens(model, 2)
    x = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        before = model(input_ids=x).logits
    model.train()
    with torch.no_grad():
        kt.vectors.add_(1.0)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=x).logits
    with torch.enable_grad():
        ref = model(input_ids=x).logits.detach()
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_save_load_round_trip(tmp_path):
    from ternlm.models.loading import load

    model = _gpt2()
    add_knowledge_tokens(model, 3)
    with torch.no_grad():
        get_knowledge(model).vectors.normal_()
    out = save_model_with_knowledge(model, None, tmp_path / "m")
    assert (out / KNOWLEDGE_FILE).is_file()
    loaded = load(out, tokenizer=False).model  # ternlm.load attaches the saved knowledge tokens
    assert get_knowledge(loaded) is not None
    torch.testing.assert_close(get_knowledge(loaded).vectors, get_knowledge(model).vectors)
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_packed_model_keeps_knowledge(tmp_path):
    from ternlm.config import TernaryConfig
    from ternlm.conversion import convert
    from ternlm.models.loading import load

    model = _gpt2()
    add_knowledge_tokens(model, 2)
    convert(model, TernaryConfig(), fmt="2bit", kernel="reference")
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    out = save_model_with_knowledge(model, None, tmp_path / "p", packed=True)
    loaded = load(out, tokenizer=False, kernel="reference").model
    assert load_knowledge(loaded, out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=1e-4, atol=1e-4)


def test_refusals(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    with pytest.raises(TernlmError, match="K >= 1"):
        add_knowledge_tokens(_gpt2(), 0)
    m = _gpt2()
    add_knowledge_tokens(m, 1)
    with pytest.raises(TernlmError, match="already"):
        add_knowledge_tokens(m, 1)
    bert = BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=50, is_decoder=True))
    with pytest.raises(TernlmError, match="GPT-2 and Llama"):
        add_knowledge_tokens(bert, 1)
