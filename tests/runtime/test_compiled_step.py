"""The compiled whole-token decode step (csrc/decode_step.inc) against the Python step it replaces:
same logits (float rounding apart) and the same greedy tokens, for GPT-2 and Llama shapes, per-tensor
and per-group scales, 2-bit and base-3 packing, every head the compiled step runs."""

import pytest
import torch

from ternlm.config import TernaryConfig
from ternlm.conversion import convert
from ternlm.errors import TernlmError
from ternlm.kernels import available_levels
from ternlm.runtime import DecodeEngine, RuntimeConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not available_levels(), reason="compiled kernels not built")


def _gpt2(fmt="2bit", tcfg=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=301, n_positions=64)
    return convert(transformers.GPT2LMHeadModel(cfg).eval(), tcfg or TernaryConfig(act_bits=8), fmt=fmt)


def _llama(fmt="2bit", tcfg=None, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=301, max_position_embeddings=64, tie_word_embeddings=True)
    args.update(kw)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).eval()
    return convert(model, tcfg or TernaryConfig(act_bits=8), fmt=fmt)


def _ids(n=9, seed=0):
    return torch.randint(0, 301, (n,), generator=torch.Generator().manual_seed(seed))


def _both(model, **kw):
    fast = DecodeEngine(model, RuntimeConfig(step="compiled", max_seq_len=48, **kw))
    slow = DecodeEngine(model, RuntimeConfig(step="python", max_seq_len=48, **kw))
    assert (fast.step, slow.step) == ("compiled", "python")
    return fast, slow


CASES = [
    ("gpt2", dict(fmt="2bit"), {}),
    ("gpt2", dict(fmt="base3"), {}),
    ("gpt2", dict(tcfg=TernaryConfig(act_bits=8, group_size=64)), {}),
    ("gpt2", dict(fmt="2bit"), dict(head="fp16")),
    ("gpt2", dict(fmt="2bit"), dict(head="int8")),
    ("llama", dict(fmt="2bit"), {}),
    ("llama", dict(tcfg=TernaryConfig(act_bits=8, group_size=64)), dict(head="int8")),
    ("llama", dict(fmt="2bit", tie_word_embeddings=False, num_key_value_heads=1), {}),
]


@pytest.mark.parametrize("kind,build,rt", CASES)
def test_compiled_step_equals_python_step(kind, build, rt):
    model = (_gpt2 if kind == "gpt2" else _llama)(**build)
    fast, slow = _both(model, **rt)
    ids = _ids()
    fast.prefill(ids)
    slow.prefill(ids)
    for tok in _ids(12, seed=3).tolist():
        a, b = fast.decode_step(tok), slow.decode_step(tok)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    assert fast.pos == slow.pos == 21
    assert fast.generate(ids, 16)["tokens"] == slow.generate(ids, 16)["tokens"]


@pytest.mark.parametrize("level", available_levels())
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_step_at_every_level(level, kind):
    """The step's own vector code (GELU / SiLU, softmax exp, attention dots) at each dispatch level,
    scalar (libm) included, against the Python step at that level."""
    from ternlm.kernels import use_level

    with use_level(level):
        model = (_gpt2 if kind == "gpt2" else _llama)()
        fast, slow = _both(model)
        ids = _ids(30)
        fast.prefill(ids)
        slow.prefill(ids)
        for tok in _ids(10, seed=5).tolist():
            torch.testing.assert_close(fast.decode_step(tok), slow.decode_step(tok), atol=2e-4, rtol=2e-4)


def test_compiled_step_is_the_default_where_it_can_run():
    assert DecodeEngine(_gpt2()).step == "compiled"
    assert DecodeEngine(_llama()).step == "compiled"


def test_float_activations_fall_back_or_refuse_in_one_line():
    model = _llama(tcfg=TernaryConfig(act_bits=None))
    assert DecodeEngine(model).step == "python"  # auto: the Python step runs A16 layers
    with pytest.raises(TernlmError, match="compiled decode step cannot run this model") as e:
        DecodeEngine(model, RuntimeConfig(step="compiled"))
    assert "\n" not in str(e.value)
    with pytest.raises(TernlmError, match="step must be one of"):
        RuntimeConfig(step="fast")


def test_compiled_step_checks_tokens_and_cache():
    rt = DecodeEngine(_gpt2(), RuntimeConfig(max_seq_len=10))
    rt.prefill(_ids(9))
    with pytest.raises(TernlmError, match="outside the vocabulary"):
        rt.decode_step(301)
    rt.decode_step(5)
    with pytest.raises(TernlmError, match="KV cache full"):
        rt.decode_step(5)


@pytest.mark.data
def test_smollm2_compiled_step_equals_python_step():
    """On real weights with int8 activations, float-rounding differences (norm statistics, exp/tanh)
    occasionally round one activation the other way, which moves the logits by a few tenths: each
    logits of the two steps stay within 5% of their range (a wrong step would not) and nearly every
    greedy pick of the compiled step is also the Python step's."""
    from tests.conftest import require_data
    from ternlm import load

    model, tok = load(str(require_data("smollm2-135m")))
    model = convert(model.eval(), TernaryConfig(act_bits=8, group_size=64), fmt="2bit")
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
    for head in ("fp32", "int8"):
        fast, slow = _both(model, head=head)
        got = fast.generate(ids, 16)["tokens"]
        agree = 0
        for j in range(len(got)):
            if j == 0:
                a, b = fast.prefill(ids), slow.prefill(ids)
            else:
                a, b = fast.decode_step(got[j - 1]), slow.decode_step(got[j - 1])
            scale = float(b.abs().max())
            assert float((a - b).abs().max()) <= 0.05 * scale, (head, j)
            agree += int(b.argmax()) == got[j]
        assert agree >= 13, (head, agree)
