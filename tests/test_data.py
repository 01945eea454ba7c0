"""Tests for the data package: record codec, meta.json, preparation and the Grain loader (the built-in sets:
tests/test_builtin.py).

Fast by design: tiny synthetic arrays in tmp_path.
"""

import json
import os
import pickle

import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data.loader import load_split, make_iterator
from data.meta import channel_stats, load_meta, to_model, to_stored, to_uint8, write_meta
from data.prepare import prepare_arrays
from data.records import FORMAT_VERSION, RecordError, decode_record, encode_record
from training.errors import UserError

# ---------------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int32", "int64", "float16", "float32", "float64",
                                   "bool", "bfloat16"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)])
def test_record_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    d = decode_record(encode_record({"x": a, "y": a[..., None]}, label=7, name="é", f=0.25, ok=True))
    assert d["x"].dtype == a.dtype and d["x"].shape == a.shape and d["x"].tobytes() == a.tobytes()
    assert d["y"].shape == a.shape + (1,)
    assert d["label"] == 7 and d["name"] == "é" and d["f"] == 0.25 and d["ok"] is True
    assert "v" not in d


def test_record_big_endian_and_numpy_scalars():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    d = decode_record(encode_record({"x": a}, label=np.int64(3)))
    np.testing.assert_array_equal(d["x"], a)
    assert d["x"].dtype == np.float32 and d["label"] == 3 and type(d["label"]) is int


def test_encode_rejects_bad_input():
    with pytest.raises(RecordError):
        encode_record({"x": np.array(["a"], dtype=object)})
    with pytest.raises(RecordError):
        encode_record({}, label=[1, 2])
    with pytest.raises(RecordError):
        encode_record({"v": np.zeros(1)})


class _Payload:
    def __reduce__(self):   # a pickle that would call a function when loaded
        return (print, ("pickle payload was executed",))


def _array_rec(**spec):
    field = {"dtype": "uint8", "shape": [2], "data": b"\x01\x02"}
    field.update(spec)
    return msgpack.packb({"v": 1, "x": field}, use_bin_type=True)


FOREIGN = {
    "empty": b"",
    "random": np.random.default_rng(0).bytes(200),
    "pickle": pickle.dumps(_Payload()),
    "json": json.dumps({"v": 1, "x": [1, 2]}).encode(),
    "msgpack_no_fields": msgpack.packb({"a": 1, "b": b"x"}),
    "msgpack_list": msgpack.packb([1, 2, 3]),
    "msgpack_int_key": msgpack.packb({1: 2}),
    "ext_type": msgpack.packb({"v": 1, "x": msgpack.ExtType(5, b"abc")}),
    "none_field": msgpack.packb({"v": 1, "x": None}),
    "bool_version": msgpack.packb({"v": True}),
    "object_dtype": _array_rec(dtype="object"),
    "str_dtype": _array_rec(dtype="<U1"),
    "short_data": _array_rec(shape=[3]),
    "absurd_shape": _array_rec(shape=[2**40, 2**40]),
    "negative_shape": _array_rec(shape=[-2]),
    "too_many_dims": _array_rec(shape=[1] * 20, data=b"\x01"),
    "missing_data": msgpack.packb({"v": 1, "x": {"dtype": "uint8", "shape": [1]}}),
    "deep_nesting": b"\x91" * 100_000,
    "trailing_bytes": encode_record({"x": np.zeros(2)}) + b"\x00",
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_decode_rejects_foreign_bytes(name, capsys):
    with pytest.raises(RecordError):
        decode_record(FOREIGN[name])
    assert "executed" not in capsys.readouterr().out


def test_decode_rejects_newer_version_with_upgrade_hint():
    with pytest.raises(RecordError, match="upgrade"):
        decode_record(msgpack.packb({"v": FORMAT_VERSION + 1, "x": 1}))


def test_decode_raises_only_record_error_on_mutations():
    """Truncations and random byte edits of a valid record either decode or raise RecordError, nothing else."""
    rng = np.random.default_rng(1)
    good = encode_record({"x": rng.integers(0, 255, (4, 4, 1), dtype=np.uint8)}, label=3)
    for cut in range(len(good)):
        with pytest.raises(RecordError):
            decode_record(good[:cut])
    for _ in range(2000):
        b = bytearray(good)
        for i in rng.integers(0, len(b), rng.integers(1, 4)):
            b[i] = rng.integers(0, 256)
        try:
            assert isinstance(decode_record(bytes(b)), dict)
        except RecordError:
            pass


def test_decode_rejects_non_bytes():
    with pytest.raises(RecordError):
        decode_record({"v": 1})


# ------------------------------------------------------------------------------------------------------- meta


def test_meta_round_trip_and_errors(tmp_path):
    meta = {"format_version": 1, "name": "s", "shape": [2, 2, 1], "dtype": "uint8", "num_classes": 2,
            "class_names": ["a", "b"], "splits": {}, "shift": [127.5], "scale": [1 / 127.5]}
    write_meta(tmp_path / "s", meta)
    assert load_meta(tmp_path / "s") == meta
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["meta.json"]   # no temp file left behind
    assert (tmp_path / "s" / "meta.json").stat().st_mode & 0o777 == 0o644    # a shared set: readable by all
    with pytest.raises(TypeError):   # a write that fails half-way leaves the meta.json that was there, and no temp
        write_meta(tmp_path / "s", {**meta, "class_names": ["a", object()]})
    assert load_meta(tmp_path / "s") == meta and [p.name for p in (tmp_path / "s").iterdir()] == ["meta.json"]
    write_meta(tmp_path / "s", {**meta, "format_version": 99})
    with pytest.raises(UserError, match="upgrade"):
        load_meta(tmp_path / "s")
    with pytest.raises(UserError, match=r"python prepare_data.py data=digits"):   # a built-in: by its name
        load_meta(tmp_path / "digits")
    with pytest.raises(UserError, match=r"prepare_data.py data=<config>.*source=\.\.\. vae=\.\.\. out="):
        load_meta(tmp_path / "nothere")   # anything else: the commands that make sets, not a config that is not there
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no meta.json"):
        load_meta(tmp_path / "empty")
    (tmp_path / "empty" / "meta.json").write_text("{not json")
    with pytest.raises(UserError):
        load_meta(tmp_path / "empty")
    # fields of the wrong type or shape fail in one line naming the field, not deep inside the loader or the model
    for field, value in [("dtype", "uint4"), ("num_classes", "ten"), ("shape", 64), ("shift", [1.0, 2.0]),
                         ("splits", {"train": {"num_records": 3}}), ("num_classes", True), ("dtype", ["uint8"]),
                         ("text", {"dim": 3}), ("text", "x"), ("encoder", "vae")]:   # these four: a TypeError/KeyError
        write_meta(tmp_path / "s", {**meta, field: value})
        with pytest.raises(UserError, match=rf"meta.json: {field}|meta.json: split"):
            load_meta(tmp_path / "s")
    # a latent set names the encode command that made it, with its VAE
    write_meta(tmp_path / "lat", {**meta, "encoder": {"vae": "sd3"}})
    f = tmp_path / "lat" / "meta.json"
    f.write_text(f.read_text().replace('"format_version": 1', '"format_version": 0'))
    with pytest.raises(UserError, match=r"vae=sd3 out=.*lat"):
        load_meta(tmp_path / "lat")


def test_data_identity_names_the_autoencoder():
    from data.prepare import data_identity, data_mismatch

    meta = {"name": "lat", "shape": [4, 4, 4], "dtype": "float16", "num_classes": 2, "shift": [0.0] * 4,
            "scale": [0.5] * 4, "splits": {"train": {"num_records": 8}}, "encoder": {"vae": "sd3"}}
    saved = {"data_identity": data_identity(meta)}
    assert data_mismatch(saved, meta) is None
    assert "encoder" in data_mismatch(saved, {**meta, "encoder": {"vae": "sdxl"}})     # re-encoded by another VAE
    assert "encoder" in data_mismatch(saved, {**meta, "scale": [0.25] * 4})
    old = {"data_identity": {k: v for k, v in data_identity(meta).items() if k != "encoder"}}
    assert data_mismatch(old, meta) is None   # runs saved before the encoder was recorded are not refused for it


def test_model_space_maps():
    meta = {"dtype": "uint8", "shift": [127.5, 0.0], "scale": [1 / 127.5, 2.0]}
    x = np.array([[0, 1], [255, 3]], np.uint8)
    m = to_model(x, meta)
    assert m.dtype == np.float32
    np.testing.assert_allclose(m, [[-1, 2], [1, 6]], atol=1e-6)
    np.testing.assert_allclose(to_stored(m, meta), x, atol=1e-4)
    pix = {"dtype": "uint8", "shift": [127.5], "scale": [1 / 127.5]}
    np.testing.assert_array_equal(to_uint8(np.array([[-3.0], [0.0], [0.999], [5.0]]), pix), [[0], [128], [255], [255]])
    with pytest.raises(UserError):
        to_uint8(m, {**meta, "dtype": "float16"})


def test_channel_stats_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (50, 3, 4, 2), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=7)
    np.testing.assert_allclose(mean, x.reshape(-1, 2).mean(0))
    np.testing.assert_allclose(std, x.reshape(-1, 2).std(0))


# ---------------------------------------------------------------------------------------------- preparation and loading

N, K = 40, 4


def _synthetic():
    """Records whose id is readable from the image (corners) and whose flip is visible (a horizontal ramp)."""
    x = np.zeros((N, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0] = x[:, 0, 3, 0] = np.arange(N)
    x[:, 1:, :, 0] = [100, 150, 200, 250]
    return x, np.arange(N) % K


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    x, y = _synthetic()
    meta = prepare_arrays(d, "synth", {"train": (x, y), "test": (x[:8], y[:8])}, list("abcd"), "test",
                          num_shards={"train": 3, "test": 1})
    return meta, d


def _ids(batch):
    """Record ids of a batch in model space (undo the [-1, 1] map of the corner pixel)."""
    return np.rint(batch["x"][:, 0, 0, 0] * 127.5 + 127.5).astype(int)


def test_prepare_writes_layout_and_meta(synth):
    meta, d = synth
    assert load_meta(d) == meta
    assert meta["splits"]["train"] == {"files": [f"train-0000{i}-of-00003.array_record" for i in range(3)],
                                       "num_records": N}
    assert meta["shape"] == [4, 4, 1] and meta["dtype"] == "uint8" and meta["class_names"] == list("abcd")
    assert meta["shift"] == [127.5] and meta["scale"] == [1 / 127.5] and meta["encoder"] is None
    np.testing.assert_allclose(meta["channel_mean"], _synthetic()[0].mean())
    assert not [p for p in d.iterdir() if p.name.startswith(".")]    # no temp files left


def test_load_split_in_order(synth, monkeypatch):
    """In stored order, a few records per read: reading a whole shard at once (read_all) held 7 GB for a shard of
    7,500 captioned records with T5 features, to keep their images."""
    import data.loader as loader

    reads, Reader = [], loader.ArrayRecordReader

    class Counting(Reader):
        def read(self, *args):
            out = super().read(*args)
            reads.append(len(out))
            return out

    monkeypatch.setattr(loader, "ArrayRecordReader", Counting)
    monkeypatch.setattr(loader, "READ_BYTES", 1)   # one record a read
    x, y = _synthetic()
    xs, ys = load_split(*synth, "train")
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    assert sum(reads) == N and max(reads) == 1
    # from a record on (a resumed stage-2 copy of latents): the records before it are not read, nor their shards
    from data.loader import read_records
    for start in (1, N // 3, N // 3 + 1, N - 1):
        reads.clear()
        n, recs = read_records(*synth, "train", start=start)
        assert n == N and [int(r["label"]) for r in recs] == y[start:].tolist() and sum(reads) == N - start


def test_batches_shapes_values_and_epochs(synth):
    it = make_iterator(*synth, "train", batch_size=8, seed=0)
    batches = [next(it) for _ in range(2 * N // 8)]
    b = batches[0]
    assert b["x"].shape == (8, 4, 4, 1) and b["x"].dtype == np.float32 and b["label"].dtype == np.int32
    assert b["label"].shape == (8,) and -1 <= b["x"].min() and b["x"].max() <= 1
    epochs = [np.concatenate([_ids(b) for b in batches[i:i + N // 8]]) for i in (0, N // 8)]
    for ids in epochs:
        assert sorted(ids) == list(range(N))                      # every record exactly once per epoch
    assert not np.array_equal(epochs[0], epochs[1])              # reshuffled
    assert not np.array_equal(epochs[0], np.arange(N))
    for b in batches:
        np.testing.assert_array_equal(b["label"], _ids(b) % K)    # labels travel with their images


def test_no_shuffle_keeps_order(synth):
    it = make_iterator(*synth, "train", batch_size=10, seed=0, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([_ids(next(it)) for _ in range(4)]), np.arange(N))


def test_seed_changes_order(synth):
    a = next(make_iterator(*synth, "train", batch_size=N, seed=0))
    b = next(make_iterator(*synth, "train", batch_size=N, seed=1))
    assert not np.array_equal(_ids(a), _ids(b))


def test_hflip_flips_some_images(synth):
    it = make_iterator(*synth, "train", batch_size=N, seed=0, hflip=True)
    x = next(it)["x"]
    flipped = x[:, 1, 0, 0] > x[:, 1, 3, 0]
    assert 0 < flipped.sum() < N
    ramp = np.array([100, 150, 200, 250]) / 127.5 - 1
    np.testing.assert_allclose(x[flipped, 1, :, 0], np.broadcast_to(ramp[::-1], (flipped.sum(), 4)), atol=1e-6)
    np.testing.assert_allclose(x[~flipped, 1, :, 0], np.broadcast_to(ramp, ((~flipped).sum(), 4)), atol=1e-6)


@pytest.mark.parametrize("hflip", [False, True])
def test_state_resume_is_exact(synth, hflip):
    """Also across reading-thread counts (data.loader.read_threads: 1 on 2 cores, up to 4 elsewhere): a run moved to
    a larger host resumes to the same batches."""
    it = make_iterator(*synth, "train", batch_size=8, seed=5, hflip=hflip, threads=1)
    for _ in range(7):                                            # into the second (reshuffled) epoch
        next(it)
    state = it.get_state()
    json.dumps(state)                                              # checkpointable as JSON
    expected = [next(it) for _ in range(6)]
    it2 = make_iterator(*synth, "train", batch_size=8, seed=5, hflip=hflip, threads=3)
    it2.set_state(state)
    for e in expected:
        g = next(it2)
        assert g["x"].tobytes() == e["x"].tobytes() and g["label"].tobytes() == e["label"].tobytes()


def test_reading_threads_follow_the_cores_this_process_may_use(monkeypatch):
    """One thread on 2 usable cores (a second fights the first for the GIL), up to 4 beyond; a job pinned to 2 cores
    of a 64-core node counts 2."""
    from data.loader import read_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    for usable, want in ((1, 1), (2, 1), (3, 3), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=usable: set(range(n)), raising=False)
        assert read_threads() == want, usable


def test_process_shards_are_disjoint_and_equal(synth):
    parts = []
    for p in range(3):
        it = make_iterator(*synth, "train", batch_size=N // 3, seed=0, process_index=p, process_count=3)
        parts.append(set(_ids(next(it))))
    assert all(len(s) == N // 3 for s in parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    with pytest.raises(UserError):
        make_iterator(*synth, "train", batch_size=1, seed=0, process_index=3, process_count=3)


def test_batch_larger_than_split(synth):
    with pytest.raises(UserError, match="batch size"):
        make_iterator(*synth, "test", batch_size=9, seed=0)
    with pytest.raises(UserError, match="no split"):
        make_iterator(*synth, "valid", batch_size=1, seed=0)


def _write_shard(path, records):
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


@pytest.mark.parametrize("bad", [encode_record({"x": np.zeros((4, 4, 1), np.uint8)}, label=K),
                                 encode_record({"x": np.zeros((4, 3, 1), np.uint8)}, label=0),
                                 encode_record({"x": np.zeros((4, 4, 1), np.float32)}, label=0),
                                 encode_record({"x": np.zeros((4, 4, 1), np.uint8)}),
                                 b"not a record"])
def test_bad_record_raises_record_error(tmp_path, bad):
    x, y = _synthetic()
    meta = prepare_arrays(tmp_path, "synth", {"train": (x[:8], y[:8])}, list("abcd"), "t", num_shards=1)
    good = [encode_record({"x": x[i]}, label=int(y[i])) for i in range(8)]
    _write_shard(tmp_path / meta["splits"]["train"]["files"][0], good[:5] + [bad] + good[6:])
    with pytest.raises(RecordError, match="record 5"):
        next(make_iterator(meta, tmp_path, "train", batch_size=8, seed=0))
    with pytest.raises(RecordError, match="record 5"):
        load_split(meta, tmp_path, "train")


def test_missing_and_corrupt_shards(tmp_path):
    x, y = _synthetic()
    meta = prepare_arrays(tmp_path, "synth", {"train": (x, y)}, list("abcd"), "t", num_shards=2)
    shard = tmp_path / meta["splits"]["train"]["files"][1]
    shard.write_bytes(np.random.default_rng(0).bytes(70_000))
    with pytest.raises(UserError, match=shard.name):
        make_iterator(meta, tmp_path, "train", batch_size=4, seed=0)
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard.name} is missing"):
        make_iterator(meta, tmp_path, "train", batch_size=4, seed=0)
    with pytest.raises(UserError, match=f"{shard.name} is missing"):
        load_split(meta, tmp_path, "train")


def test_float_data_is_standardised(tmp_path):
    x = np.random.default_rng(0).normal(3.0, 2.0, (64, 2, 2, 3)).astype(np.float16)
    meta = prepare_arrays(tmp_path, "lat", {"train": (x, np.zeros(64, int))}, ["z"], "t", encoder="vae-test")
    assert meta["dtype"] == "float16" and meta["encoder"] == "vae-test"
    b = next(make_iterator(meta, tmp_path, "train", batch_size=64, seed=0, shuffle=False))["x"]
    np.testing.assert_allclose(b.reshape(-1, 3).mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(b.reshape(-1, 3).std(0), 1, atol=1e-3)
    np.testing.assert_allclose(to_stored(b, meta), x.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_workers_match_in_process_order(synth):
    ref = make_iterator(*synth, "train", batch_size=8, seed=2, hflip=True)
    it = make_iterator(*synth, "train", batch_size=8, seed=2, hflip=True, workers=1)
    try:
        for _ in range(6):
            assert next(it)["x"].tobytes() == next(ref)["x"].tobytes()
    finally:
        it.close()
