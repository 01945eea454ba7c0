"""Fuzz the record decoder: any bytes give a record or RecordError, never another exception, never a hang. The
encoder writes only what the decoder reads back, and whole-split reads turn corrupt shards into one-line errors."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from data.records import RecordError, decode_record, encode_record
from training.errors import UserError

FUZZ = settings(max_examples=200, deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _valid(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(8, 8, 1), dtype=np.uint8)
    return encode_record({"x": x, "f": rng.standard_normal(3).astype(np.float16)}, label=int(seed % 10), name="d")


def _check(b: bytes):
    try:
        rec = decode_record(b)
    except RecordError:
        return None
    assert isinstance(rec, dict)
    for k, v in rec.items():
        assert isinstance(k, str) and isinstance(v, (np.ndarray, bool, int, float, str)), (k, type(v))
    return rec


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(b):
    _check(b)


@FUZZ
@given(st.integers(0, 2**16), st.data())
def test_truncated_valid_record(seed, data):
    b = _valid(seed)
    cut = data.draw(st.integers(0, len(b) - 1))
    assert _check(b[:cut]) is None  # every strict prefix of a record is incomplete msgpack


@FUZZ
@given(st.integers(0, 2**16), st.data())
def test_bit_flipped_valid_record(seed, data):
    b = bytearray(_valid(seed))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << data.draw(st.integers(0, 7))
    _check(bytes(b))


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(), c, max_size=4),
                    max_leaves=12))
def test_structured_msgpack(obj):
    """Well-formed msgpack of the wrong structure (the likeliest foreign input) is rejected cleanly too."""
    import msgpack

    try:
        b = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _check(b)
    if isinstance(obj, dict):
        _check(msgpack.packb({**obj, "v": 1}, use_bin_type=True))


def test_unvalidated_inputs_are_rejected():
    big = {"v": 1, "x": {"dtype": "uint8", "shape": [2**40, 2**40], "data": b""}}
    import msgpack

    for b in (msgpack.packb(big), msgpack.packb({"v": 1, "x": {"dtype": "object", "shape": [1], "data": b"\0" * 8}}),
              msgpack.packb({"v": 2}), msgpack.packb({"v": True}), msgpack.packb([1, 2]),
              msgpack.packb({"v": 1, "x": msgpack.ExtType(1, b"")})):
        assert _check(b) is None
    rec = _check(_valid(3))
    assert rec["x"].shape == (8, 8, 1) and rec["label"] == 3


def test_encode_refuses_what_decode_would_reject():
    """The decoder's limits hold at encode time: a bad caption fails at preparation, not mid-training."""
    at_limit = {"caption": "é" * (1 << 15), "big": (1 << 64) - 1, "small": -(1 << 63)}   # 65536 UTF-8 bytes
    rec = decode_record(encode_record({"x": np.zeros((1,) * 8, np.uint8)}, **at_limit))
    assert {k: rec[k] for k in at_limit} == at_limit and rec["x"].ndim == 8
    assert len(decode_record(encode_record({f"a{i}": np.zeros(1, np.uint8) for i in range(255)}))) == 255
    for arrays, scalars, match in (
            ({}, {"caption": "é" * (1 << 15) + "a"}, "65537 bytes of UTF-8.*shorten it"),
            ({}, {"label": 2 ** 70}, "does not fit a record's 64-bit integer"),
            ({}, {"label": -(1 << 63) - 1}, "64-bit integer"),
            ({}, {"caption": "\ud800"}, "not valid text"),
            ({f"a{i}": np.zeros(1, np.uint8) for i in range(256)}, {}, "at most 255 fields"),
            ({"x": np.zeros((1,) * 9, np.uint8)}, {}, "at most 8 dims"),
            ({}, {"n" * 70000: 1}, "field name is 70000 bytes")):
        with pytest.raises(RecordError, match=match):
            encode_record(arrays, **scalars)


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda k: k != "v"),
                       st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8), max_size=6))
def test_whatever_encodes_decodes_back(scalars):
    try:
        b = encode_record({}, **scalars)
    except RecordError:
        return
    assert decode_record(b) == scalars


def test_load_text_errors_are_one_line(tmp_path):
    """load_text shares load_split's checks: a corrupt shard and a record without text are one-line UserErrors."""
    from data.loader import load_text
    from data.prepare import prepare_arrays

    x, y = np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, np.int64)
    text = {"train": {"text": np.ones((4, 3, 2), np.float16), "mask": np.ones((4, 3), bool), "caption": list("abcd")}}
    meta = prepare_arrays(tmp_path / "t", "t", {"train": (x, y)}, ["c"], "test", text=text, text_meta={"dim": 2,
                                                                                                       "max_tokens": 3})
    assert load_text(meta, tmp_path / "t", "train")["caption"] == list("abcd")
    plain = prepare_arrays(tmp_path / "p", "p", {"train": (x, y)}, ["c"], "test")   # records without text
    with pytest.raises(UserError, match="bad record 0 .*'text' should be") as e:
        load_text({**plain, "text": meta["text"]}, tmp_path / "p", "train")
    assert "\n" not in str(e.value)
    shard = tmp_path / "t" / meta["splits"]["train"]["files"][0]
    b = bytearray(shard.read_bytes())
    b[100:300] = bytes(v ^ 0xFF for v in b[100:300])   # the index still reads, the records do not
    shard.write_bytes(bytes(b))
    with pytest.raises(UserError, match=f"cannot read .*{shard.name}.*the shard is corrupt") as e:
        load_text(meta, tmp_path / "t", "train")
    assert "\n" not in str(e.value)
