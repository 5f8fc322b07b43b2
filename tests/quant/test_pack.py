import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm.errors import TernlmError
from ternlm.quant.pack import (QK_2BIT, QK_BASE3, pack, pack_2bit, pack_base3, packed_row_bytes,
                               padded_in_features, unpack, unpack_2bit, unpack_base3)


def _codes(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (out_f, in_f), generator=g).to(torch.int8)


@settings(max_examples=60, deadline=None)
@given(out_f=st.integers(1, 9), in_f=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_2bit_round_trip(out_f, in_f, seed):
    codes = _codes(out_f, in_f, seed)
    packed = pack_2bit(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (out_f, padded_in_features(in_f, "2bit") // 4)
    assert torch.equal(unpack_2bit(packed, codes.shape), codes)


@settings(max_examples=60, deadline=None)
@given(out_f=st.integers(1, 9), in_f=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_base3_round_trip(out_f, in_f, seed):
    codes = _codes(out_f, in_f, seed)
    packed = pack_base3(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (out_f, padded_in_features(in_f, "base3") // 5)
    assert torch.equal(unpack_base3(packed, codes.shape), codes)


def test_base3_all_243_trit_combinations():
    combos = torch.tensor(list(itertools.product([-1, 0, 1], repeat=5)), dtype=torch.int8)  # (243, 5)
    codes = torch.zeros(243, QK_BASE3, dtype=torch.int8)
    codes[:, 0:QK_BASE3:32] = combos  # the five weights that share byte 0
    packed = pack_base3(codes)
    assert len(set(packed[:, 0].tolist())) == 243
    assert torch.equal(unpack_base3(packed, codes.shape), codes)


def test_2bit_layout_matches_diagram():
    # weight j + 64*s of a block lives in bits [2s+1:2s] of byte j, stored as code + 1
    codes = torch.zeros(1, QK_2BIT, dtype=torch.int8)
    codes[0, 5] = 1          # s=0, j=5
    codes[0, 64 + 5] = -1    # s=1, j=5
    codes[0, 192 + 7] = 1    # s=3, j=7
    packed = pack_2bit(codes)[0]
    assert packed[5].item() == (2 << 0) | (0 << 2) | (1 << 4) | (1 << 6)
    assert packed[7].item() == (1 << 0) | (1 << 2) | (1 << 4) | (2 << 6)
    assert packed[0].item() == 0b01010101


def test_padding_is_code_zero():
    codes = torch.ones(2, 3, dtype=torch.int8)
    full = unpack_2bit(pack_2bit(codes), (2, 64))
    assert torch.equal(full[:, 3:], torch.zeros(2, 61, dtype=torch.int8))


def test_2bit_tail_planes_match_diagram():
    # 576 = two full blocks + one tail plane of 64 weights in 16 bytes: weight t*64 + j + 16*s of
    # the tail lives in bits [2s+1:2s] of tail byte j; the row is 144 bytes, exactly 2 bits per weight
    codes = torch.zeros(1, 576, dtype=torch.int8)
    codes[0, 512 + 3] = 1        # s=0, j=3
    codes[0, 512 + 16 + 3] = -1  # s=1, j=3
    codes[0, 512 + 48 + 15] = 1  # s=3, j=15
    packed = pack_2bit(codes)[0]
    assert packed.shape == (144,) and packed_row_bytes(576, "2bit") == 144
    assert packed[128 + 3].item() == (2 << 0) | (0 << 2) | (1 << 4) | (1 << 6)
    assert packed[128 + 15].item() == (1 << 0) | (1 << 2) | (1 << 4) | (2 << 6)
    assert packed[:128].eq(0b01010101).all()
    for in_f, row in ((64, 16), (192, 48), (256, 64), (320, 80), (1536, 384), (2880, 720)):
        assert packed_row_bytes(in_f, "2bit") == row


def test_rows_of_the_earlier_layout_are_upgraded():
    from ternlm.quant.pack import legacy_row_bytes_2bit, upgrade_2bit

    for in_f in (576, 100, 768, 2880):
        codes = _codes(5, in_f, in_f)
        u = torch.ones(5, -(-in_f // 256) * 256, dtype=torch.uint8)  # earlier: whole 256-weight blocks
        u[:, :in_f] = (codes + 1).to(torch.uint8)
        u = u.reshape(5, -1, 4, 64)
        old = (u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)).reshape(5, -1)
        assert old.shape[1] == legacy_row_bytes_2bit(in_f)
        new = pack_2bit(codes)
        assert torch.equal(upgrade_2bit(old, new.shape[1]), new)
        assert torch.equal(upgrade_2bit(old.reshape(1, 5, -1), new.shape[1]), new[None])  # expert stacks
        assert upgrade_2bit(new, new.shape[1]) is new


@pytest.mark.parametrize("fmt,bits", [("2bit", 2.0), ("base3", 1.6)])
def test_bits_per_weight(fmt, bits):
    widths = (768, 3072, 576, 1536, 2880) if fmt == "2bit" else (768, 3072)  # GPT-2, SmolLM2, GPT-OSS
    for in_f in widths:  # padding costs at most 1/24 extra (2-bit: none on these)
        kp = padded_in_features(in_f, fmt)
        assert packed_row_bytes(in_f, fmt) * 8 == bits * kp
        assert kp <= in_f * 25 / 24
    codes = _codes(3, 3072, 0)
    assert torch.equal(unpack(pack(codes, fmt), codes.shape, fmt), codes)


def test_rejects_bad_input():
    with pytest.raises(TernlmError):
        pack_2bit(torch.full((2, 4), 2, dtype=torch.int8))
    with pytest.raises(TernlmError):
        pack_base3(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(TernlmError):
        unpack_2bit(torch.zeros(2, 10, dtype=torch.uint8), (2, 40))
    with pytest.raises(TernlmError):
        pack(torch.zeros(2, 4, dtype=torch.int8), "3bit")
