import json

import numpy as np
import pytest

from ternlm.data.shards import (HEADER_BYTES, MAGIC, PrepareConfig, load_tokens, prepare_data, read_header,
                                read_shard, shard_paths, write_shard)
from ternlm.errors import TernlmError


@pytest.mark.parametrize("vocab,version,itemsize", [(50257, 1, 2), (65536, 1, 2), (100_000, 2, 4)])
def test_round_trip(tmp_path, vocab, version, itemsize):
    toks = np.random.default_rng(0).integers(0, vocab, size=1000)
    toks[:2] = (0, vocab - 1)
    p = write_shard(tmp_path / "train_000000.bin", toks, vocab)
    header = np.fromfile(p, dtype="<i4", count=256)
    assert header[:3].tolist() == [MAGIC, version, 1000] and not header[3:].any()
    assert p.stat().st_size == HEADER_BYTES + 1000 * itemsize
    assert read_header(p) == (version, 1000)
    np.testing.assert_array_equal(read_shard(p), toks)


def test_modded_nanogpt_reader_layout(tmp_path):
    # modded-nanogpt's _load_data_shard: header int32[256], then uint16 tokens
    toks = np.arange(300) % 50000
    p = write_shard(tmp_path / "a.bin", toks, 50257)
    raw = p.read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    assert header[0] == 20240520 and header[1] == 1
    np.testing.assert_array_equal(np.frombuffer(raw[1024:], dtype=np.uint16)[:header[2]], toks)


def test_rejects_corrupt_files(tmp_path):
    good = write_shard(tmp_path / "g.bin", np.arange(100), 200)
    raw = good.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[:-3])
    (tmp_path / "short.bin").write_bytes(raw[:100])
    foreign = bytearray(raw)
    foreign[0:4] = np.int32(12345).tobytes()
    (tmp_path / "foreign.bin").write_bytes(bytes(foreign))
    badver = bytearray(raw)
    badver[4:8] = np.int32(7).tobytes()
    (tmp_path / "ver.bin").write_bytes(bytes(badver))
    for name, msg in (("trunc", "truncated"), ("short", "not a token shard"), ("foreign", "magic"),
                      ("ver", "version 7")):
        with pytest.raises(TernlmError, match=msg) as e:
            read_shard(tmp_path / f"{name}.bin")
        assert "\n" not in str(e.value)


def test_writer_refuses_out_of_vocab(tmp_path):
    with pytest.raises(TernlmError, match="token ids"):
        write_shard(tmp_path / "x.bin", np.array([0, 5]), 5)


def test_missing_shards_and_meta(tmp_path):
    with pytest.raises(TernlmError, match="no train shards"):
        shard_paths(tmp_path, "train")
    with pytest.raises(TernlmError, match="does not exist"):
        shard_paths(tmp_path / "nope", "train")
    write_shard(tmp_path / "train_000000.bin", np.arange(10), 20)
    with pytest.raises(TernlmError, match="meta.json"):
        load_tokens(tmp_path, "train")


def test_prepare_data(tmp_path, gpt2_tokenizer_dir):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    (tmp_path / "docs" / "b.txt").write_text("To be, or not to be, that is the question. " * 30)
    cfg = PrepareConfig(sources=(str(tmp_path / "docs"),), out=str(tmp_path / "data"),
                        tokenizer=str(gpt2_tokenizer_dir), val_fraction=0.2, shard_tokens=200, progress=False)
    meta = prepare_data(cfg)
    d = tmp_path / "data"
    assert json.loads((d / "meta.json").read_text())["vocab_size"] == 50257
    train, val = load_tokens(d, "train"), load_tokens(d, "val")
    assert train.size == meta["train_tokens"] and val.size == meta["val_tokens"]
    assert len(shard_paths(d, "train")) == -(-train.size // 200) > 1
    eot = meta["eot_token_id"]
    assert (train == eot).sum() == 2 and train[0] == eot and (val == eot).sum() == 2
    assert 0.1 < val.size / (train.size + val.size) < 0.3


def test_prepare_data_bad_input(tmp_path):
    with pytest.raises(TernlmError, match="val_fraction"):
        PrepareConfig(sources=("x",), val_fraction=1.5)
    with pytest.raises(TernlmError, match="no such"):
        prepare_data(PrepareConfig(sources=(str(tmp_path / "missing.txt"),), out=str(tmp_path / "o"),
                                   progress=False))
