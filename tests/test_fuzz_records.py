"""Fuzz the record decoder: any bytes give a record or RecordError, never another exception, never a hang."""

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from data.records import RecordError, decode_record, encode_record

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
