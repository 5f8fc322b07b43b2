"""pt-bitnet on mixture-of-experts blocks (GPT-OSS): routed-token Hessians per expert, packed experts,
per-layer-kind masks, streaming equal to in-memory."""

import json

import torch

from tests.conftest import require_data
from tests.moe.test_moe import _dequantized_reference, _greedy, gpt_oss_config
from tests.streaming.test_streaming import assert_same_tensors
from ternlm.quantization import PTQ_LOG, QuantizeConfig, quantize


def _gpt_oss_dir(path):
    from transformers import AutoTokenizer, GptOssForCausalLM

    tok = AutoTokenizer.from_pretrained(str(require_data("gpt2-tokenizer")))
    torch.manual_seed(0)
    model = GptOssForCausalLM(gpt_oss_config(vocab_size=len(tok))).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size="2MB")
    tok.save_pretrained(path)
    return path


def _cfg():
    return QuantizeConfig(method="pt-bitnet", calib=str(require_data("wikitext-2", "tokens.valid.txt")),
                          calib_tokens=256, seq_len=64, group_size=32, reconstruct_steps=2, act_bits=None,
                          float_dtype="fp32")


def test_block_kwargs_give_each_layer_kind_its_mask(tmp_path):
    from transformers import GptOssForCausalLM

    from ternlm.ptq.calibration import block_kwargs, capture_block_inputs

    torch.manual_seed(0)
    model = GptOssForCausalLM(gpt_oss_config()).eval()
    ids = torch.randint(0, 128, (2, 32))
    blocks = model.model.layers
    x, kw = capture_block_inputs(model, blocks, ids)
    kws = block_kwargs(model, blocks, ids, kw)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    m0, m1 = kws[0].get("attention_mask"), kws[1].get("attention_mask")
    assert not (isinstance(m0, torch.Tensor) and isinstance(m1, torch.Tensor) and torch.equal(m0, m1))
    # each block fed its own arguments computes what the model computes
    from ternlm.ptq.calibration import run_block

    with torch.no_grad():
        h = model(ids[:1], output_hidden_states=True, use_cache=False).hidden_states
        y0 = run_block(blocks[0], x[:1], kws[0])
        y1 = model.model.norm(run_block(blocks[1], y0, kws[1]))  # the last hidden state is normed
        wrong = model.model.norm(run_block(blocks[1], y0, kws[0]))  # block 0's sliding mask
    torch.testing.assert_close(y0, h[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, h[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrong, h[2], rtol=1e-3, atol=1e-3)


def test_ptbitnet_gpt_oss_experts_in_memory_and_streaming(tmp_path):
    from ternlm import load
    from ternlm.moe.experts import TernaryExperts
    from ternlm.nn.verify import verify

    src = _gpt_oss_dir(tmp_path / "src")
    cfg = _cfg()
    mem = quantize(src, tmp_path / "mem", cfg, progress=False, stream=False)
    st = quantize(src, tmp_path / "st", cfg, progress=False, stream=True)
    assert_same_tensors(mem, st)
    rec = json.loads((mem / "ternlm_quantization.json").read_text())
    assert rec["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    log = json.loads((mem / PTQ_LOG).read_text())
    for b in log["blocks"]:
        ex = b["experts"]["mlp.experts"]
        assert sum(ex["tokens"]) == 256 * 2  # every calibration token routed to its top-2 experts, no more
        assert set(ex["fallback"]) == {e for e, n in enumerate(ex["tokens"]) if n < 16}
        assert ex["rel_err"]["gate_up"] is not None and ex["rel_err"]["down"] is not None
    packed, _ = load(mem)
    assert isinstance(packed.model.layers[0].mlp.experts, TernaryExperts)
    rep = verify(packed)
    assert rep.ok and sum("experts[" in l.name for l in rep.layers) == 2 * 2 * 8
    assert _greedy(packed) == _greedy(_dequantized_reference(packed))


def test_routed_hessian_rounding_beats_absmean_on_routed_tokens():
    """An expert rounded over the Hessian of its own tokens has a lower output error on them."""
    from ternlm.config import TernaryConfig
    from ternlm.ptq.rounding import expand_groups, quantize_layer
    from ternlm.quant.ternary import ternarize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    x = torch.randn(200, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = (x.t() @ x).double() / x.shape[0]
    c, s, _ = quantize_layer(w, h, 32)
    t = ternarize(w, TernaryConfig(granularity="per_group", group_size=32))
    err = lambda q: float(((x @ (w - q).t()) ** 2).mean())
    assert err(c * expand_groups(s, 64, 32)) < err(t.codes.float() * expand_groups(t.scale, 64, 32))
