"""GPT-OSS ternary experts: MXFP4 decode, TernaryExperts vs its reference, quantize -> load -> generate."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ternlm.config import TernaryConfig
from ternlm.errors import TernlmError
from ternlm.moe import mxfp4
from ternlm.moe.experts import TernaryExperts, expert_modules


def test_mxfp4_decode_known_values():
    # one row of 32 values: codes 0..15 then 15..0; nibble pairs (low = element 2j)
    codes = list(range(16)) + list(range(15, -1, -1))
    blocks = torch.tensor([[[codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]]], dtype=torch.uint8)
    lut = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    for byte, mult in ((127, 1.0), (128, 2.0), (125, 0.25)):
        w = mxfp4.decode(blocks, torch.tensor([[byte]], dtype=torch.uint8))
        assert w.shape == (1, 32)
        assert w[0].tolist() == [lut[c] * mult for c in codes]
    # hand-checked byte: 0x7A -> element 0 = code 0xA = -1.0, element 1 = code 0x7 = 6.0; scale 2**(130-127)
    b = torch.zeros(1, 1, 16, dtype=torch.uint8)
    b[0, 0, 0] = 0x7A
    w = mxfp4.decode(b, torch.tensor([[130]], dtype=torch.uint8))
    assert w[0, :2].tolist() == [-8.0, 48.0] and not w[0, 2:].any()


def test_mxfp4_encode_decode_round_trip():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 64)
    blocks, scales = mxfp4.encode(w)
    assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
    d = mxfp4.decode(blocks, scales)
    assert torch.equal(mxfp4.decode(*mxfp4.encode(d)), d)  # FP4 values are fixed points of the encoder
    assert (d - w).abs().max() <= w.abs().amax() / 4  # coarse, but the right magnitude everywhere
    with pytest.raises(TernlmError, match="do not match"):
        mxfp4.decode(blocks, scales[..., :1])


def gpt_oss_config(**kw):
    from transformers import GptOssConfig

    d = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_local_experts=8, num_experts_per_tok=2, vocab_size=128, max_position_embeddings=128,
             layer_types=["sliding_attention", "full_attention"], sliding_window=8, tie_word_embeddings=False)
    d.update(kw)
    return GptOssConfig(**d)


def random_experts(seed=0):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(seed)
    ex = GptOssExperts(gpt_oss_config())
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.05)
    return ex


def _route(T=20, E=8, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    top, idx = logits.topk(k, dim=-1)
    return torch.randn(T, 64, generator=g), idx, top.softmax(-1)


@pytest.mark.parametrize("act_bits,gran", [(8, "per_tensor"), (None, "per_group"), (4, "per_channel")])
def test_ternary_experts_kernels_equal_reference(act_bits, gran):
    cfg = TernaryConfig(granularity=gran, group_size=32, act_bits=act_bits)
    m = TernaryExperts.from_experts(random_experts(), cfg, "2bit")
    x, idx, w = _route()
    y = m(x, idx, w)
    m.kernel = "reference"
    if act_bits is None:  # float activations: the kernels sum in another order
        torch.testing.assert_close(y, m(x, idx, w), rtol=1e-5, atol=1e-6)
    else:  # integer activations: bitwise, the compiled kernels against their twin
        assert torch.equal(y, m(x, idx, w))
    assert y.shape == x.shape and y.abs().sum() > 0


def test_ternary_experts_equal_dequantized_reference():
    ex = random_experts()
    for fmt in ("2bit", "base3"):
        m = TernaryExperts.from_experts(ex, TernaryConfig(act_bits=None), fmt)
        ref = random_experts(seed=5)
        with torch.no_grad():
            for k, v in m.dequantize().items():
                getattr(ref, k).copy_(v)
        # every slice is ternary with its own scale
        for e in range(8):
            s = ref.gate_up_proj[e].abs()
            assert len(torch.unique(s[s > 0])) == 1
        assert len(torch.unique(m.gate_up_scale)) == 8
        x, idx, w = _route()
        torch.testing.assert_close(m(x, idx, w), ref(x, idx, w), rtol=1e-4, atol=1e-5)


def test_unknown_experts_are_refused():
    class WeirdExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, 3, 4))

    model = torch.nn.Sequential(WeirdExperts())
    with pytest.raises(TernlmError, match="GptOssExperts"):
        expert_modules(model)


def save_gpt_oss(path: Path, seed=0, mxfp4_experts=False):
    """A tiny random GPT-OSS; with mxfp4_experts the experts are stored as MXFP4 blocks + scales
    (as the real checkpoint is) and the returned model holds their decoded values."""
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(gpt_oss_config()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n:
                p.normal_(0, 0.1)
    if not mxfp4_experts:
        model.save_pretrained(path, max_shard_size="60KB")
        return model
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = mxfp4.encode(v.transpose(1, 2))  # on disk (E, out, in/32, 16)
            state[k + "_blocks"], state[k + "_scales"] = blocks, scales
            with torch.no_grad():
                v.copy_(mxfp4.decode(blocks, scales).transpose(1, 2))
        else:
            state[k] = v.contiguous()
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return model


def _greedy(model, n=8):
    ids = torch.tensor([[3, 17, 42, 5]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _dequantized_reference(packed):
    """The float GPT-OSS holding the packed model's dequantized weights (and its fp16-stored tensors)."""
    from transformers import GptOssForCausalLM

    from ternlm.moe.experts import ternary_experts
    from ternlm.nn.surgery import ternary_linears

    ref = GptOssForCausalLM(packed.config).eval()
    state = {k: v for k, v in packed.state_dict().items()}
    sd = {}
    for k, v in state.items():
        sd[k] = v
    for n, m in ternary_linears(packed):
        sd[n + ".weight"] = m.dequantize_weight()
        sd[n + ".bias"] = m.bias
    for n, m in ternary_experts(packed):
        for k, v in m.dequantize().items():
            sd[f"{n}.{k}"] = v
    from ternlm.nn.embedding import RowEmbedding, RowHead

    for n, m in packed.named_modules():  # embedding / head rows (int8 by default) as float weights
        if isinstance(m, (RowEmbedding, RowHead)):
            sd[n + ".weight"] = m.dequantize()
    ref.load_state_dict({k: v for k, v in sd.items() if k in ref.state_dict()}, strict=True)
    return ref


@pytest.mark.parametrize("stream", [False, True])
def test_gpt_oss_round_trip_generate(tmp_path, stream):
    from ternlm import load
    from ternlm.nn.verify import verify
    from ternlm.quantization import QuantizeConfig, quantize

    save_gpt_oss(tmp_path / "src")
    out = quantize(tmp_path / "src", tmp_path / "q", QuantizeConfig(act_bits=None, float_dtype="fp32"),
                   stream=stream, progress=False)
    rec = json.loads((out / "ternlm_quantization.json").read_text())
    assert rec["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all("router" not in t for t in rec["targets"])
    packed, _ = load(out)
    assert isinstance(packed.model.layers[0].mlp.experts, TernaryExperts)
    assert packed.model.layers[0].mlp.router.weight.dtype == torch.float32  # router stays float
    rep = verify(packed)
    assert rep.ok and sum("experts[" in l.name for l in rep.layers) == 2 * 2 * 8
    ref = _dequantized_reference(packed)
    assert _greedy(packed) == _greedy(ref)


def test_mxfp4_source_streams_like_its_decoded_float(tmp_path):
    from ternlm.quantization import QuantizeConfig, quantize
    from tests.streaming.test_streaming import assert_same_tensors

    model = save_gpt_oss(tmp_path / "mx", mxfp4_experts=True)
    model.save_pretrained(tmp_path / "float")  # the decoded values, as float tensors
    cfg = QuantizeConfig(fmt="base3")
    a = quantize(tmp_path / "mx", tmp_path / "qa", cfg, stream=True, progress=False)
    b = quantize(tmp_path / "float", tmp_path / "qb", cfg, stream=False, progress=False)
    assert_same_tensors(a, b)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixtral_and_qwen_moe_experts(tmp_path, kind):
    """transformers 5 holds these experts as 3-D tensors too (saved per expert on disk): packed per
    expert in memory, equal to the dequantized reference; streaming refuses the per-expert layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ternlm import load
    from ternlm.quantization import QuantizeConfig, quantize

    extra = dict(num_local_experts=4) if kind == "mixtral" else dict(num_experts=4, moe_intermediate_size=32,
                                                                       shared_expert_intermediate_size=32)
    cfg = AutoConfig.for_model(kind, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, num_experts_per_tok=2,
                               max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    src_model = AutoModelForCausalLM.from_config(cfg).eval()
    src_model.save_pretrained(tmp_path / "src")
    qc = QuantizeConfig(act_bits=None)
    out = quantize(tmp_path / "src", tmp_path / "q", qc, stream=False, progress=False)
    rec = json.loads((out / "ternlm_quantization.json").read_text())
    assert rec["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    with pytest.raises(TernlmError, match="--no-stream"):
        quantize(tmp_path / "src", tmp_path / "s", qc, stream=True, progress=False)
    model, _ = load(out)
    ex = model.model.layers[0].mlp.experts
    assert isinstance(ex, TernaryExperts) and ex.style == "mixtral"
    ref = type(src_model.model.layers[0].mlp.experts)(cfg)
    with torch.no_grad():
        for k, v in ex.dequantize().items():
            getattr(ref, k).copy_(v)
    x, idx, w = _route(E=4)
    x = x[:, :32].contiguous()
    torch.testing.assert_close(ex(x, idx, w), ref(x, idx, w), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_routed_hessian_counts_only_routed_tokens():
    from ternlm.moe.hessian import RoutedHessian

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    idx = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1], [2, 1], [0, 2]])
    w = torch.rand(6, 2)
    rh = RoutedHessian(num_experts=4, in_features=4)
    rh.add(x, idx, w)
    for e in range(3):
        t, p = torch.where(idx == e)
        ref = sum(w[a, b].double() * torch.outer(x[a].double(), x[a].double()) for a, b in zip(t.tolist(), p.tolist()))
        torch.testing.assert_close(rh.h[e], ref)
        assert rh.tokens[e] == t.numel()
    assert rh.tokens[3] == 0 and not rh.h[3].any()  # never routed: nothing counted
    assert rh.tokens[:3].tolist() == [4, 4, 4]
    assert rh.finalize(min_tokens=5) == [None] * 4  # too few tokens: absmean fallback
    hs = rh.finalize(damp=0.1, min_tokens=4)
    assert hs[3] is None and all(h is not None for h in hs[:3])
    assert hs[0] is not None and torch.all(torch.linalg.eigvalsh(hs[0].double()) > 0)  # damped: positive definite
