"""The built-in data sets (Fashion-MNIST from its Debian package, sklearn's digits): loading, their splits, and
preparation on first use, including re-preparing a copy cut by an older rule. The full Fashion-MNIST is touched by
one test only, skipped when the Debian package is not installed."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from data import builtin
from data.builtin import load_builtin
from data.loader import make_iterator
from data.meta import META_FILE
from data.prepare import ensure_prepared, prepare_arrays
from training.errors import UserError


def test_digits_builtin():
    d = load_builtin("digits")
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    assert xtr.shape[1:] == (8, 8, 1) and xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert len(xtr) + len(xte) == 1797 and xtr.max() == 255 and d["class_names"] == [str(i) for i in range(10)]
    frac = np.bincount(yte, minlength=10) / (np.bincount(ytr, minlength=10) + np.bincount(yte, minlength=10))
    assert np.all(np.abs(frac - 0.2) < 0.02)                      # stratified
    np.testing.assert_array_equal(load_builtin("digits")["test"][0], xte)   # deterministic
    assert d["split_rule"] == builtin.BUILTIN_SPLITS["digits"]
    # Drawn from the whole file, not a block of it: the file groups writers, so a block would test on unseen hands.
    xf, yf = builtin.digits_in_file_order()
    pos = {xf[i].tobytes(): i for i in range(len(xf))}
    for c in range(10):
        where = np.sort([pos[im.tobytes()] for im in xte[yte == c]])
        of_class = np.flatnonzero(yf == c)
        half = of_class[len(of_class) // 2]
        assert 0.25 < np.mean(where < half) < 0.75, (c, where)


def test_unknown_builtin_lists_names():
    with pytest.raises(UserError, match="fashion_mnist, digits"):
        load_builtin("cifar")


def test_fashion_mnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nope"))
    with pytest.raises(UserError) as e:
        load_builtin("fashion_mnist")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install -y dataset-fashion-mnist" in msg and "data=digits" in msg


def test_fashion_mnist_bad_magic(tmp_path, monkeypatch):
    import gzip
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write((2049).to_bytes(4, "big") + (1).to_bytes(4, "big") * 3 + b"\x00")   # labels magic everywhere
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(UserError, match="magic number 2051"):
        load_builtin("fashion_mnist")


FASHION = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.mark.skipif(not (FASHION / "t10k-labels-idx1-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_prepare_fashion_mnist(tmp_path):
    meta, d = ensure_prepared("fashion_mnist", tmp_path)
    assert meta["shape"] == [28, 28, 1] and meta["num_classes"] == 10
    assert {s: v["num_records"] for s, v in meta["splits"].items()} == {"train": 60000, "test": 10000}


def test_ensure_prepared(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match=r"python prepare_data.py data=<config>.*source=\.\.\. vae=\.\.\."):
        ensure_prepared("mine", tmp_path)
    meta, d = ensure_prepared("digits", tmp_path)
    assert d == tmp_path / "digits" and "digits" in capsys.readouterr().out
    assert meta["shape"] == [8, 8, 1] and sum(s["num_records"] for s in meta["splits"].values()) == 1797
    monkeypatch.setattr(builtin, "_digits", lambda: pytest.fail("prepared twice"))
    assert ensure_prepared("digits", tmp_path) == (meta, d)
    b = next(make_iterator(meta, d, "train", batch_size=64, seed=0, hflip=True))
    assert b["x"].shape == (64, 8, 8, 1) and b["x"].min() == -1 and b["x"].max() == 1


def test_a_builtin_copy_cut_the_old_way_is_re_prepared(tmp_path, capsys):
    meta, d = ensure_prepared("digits", tmp_path)
    assert meta["split_rule"] == builtin.BUILTIN_SPLITS["digits"]
    # A copy prepared before meta.json recorded its split rule: the test split was a file-order tail (other writers).
    old = {k: v for k, v in meta.items() if k != "split_rule"}
    (d / META_FILE).write_text(json.dumps(old))
    from data.rebuild import reading
    with reading(d), pytest.raises(UserError, match="is being read by a run"):   # sample.py on a run of the old cut
        ensure_prepared("digits", tmp_path)
    assert json.loads((d / META_FILE).read_text()) == old   # left as it was while it was read
    capsys.readouterr()
    again, _ = ensure_prepared("digits", tmp_path)
    assert "holds the old split of digits" in capsys.readouterr().out
    assert again["split_rule"] == builtin.BUILTIN_SPLITS["digits"] and again["splits"] == meta["splits"]
    # A user's own set that happens to be called digits is theirs: never rewritten.
    mine = tmp_path / "mine" / "digits"
    x = np.zeros((4, 8, 8, 1), np.uint8)
    prepare_arrays(mine, "digits", {"train": (x, np.arange(4) % 2)}, ["a", "b"], "/home/me/scans")
    assert ensure_prepared("digits", tmp_path / "mine")[0]["splits"]["train"]["num_records"] == 4


def test_runs_started_together_prepare_a_set_once(tmp_path, capsys):
    """Two runs started together on a fresh machine both prepared the set, and the second one's rewrite deleted shards
    the first had just read meta.json for ("shard ... is missing" 2 s into a seed sweep; development_log.md).
    Preparing runs under a lock: a run that finds another preparing waits, then uses what that one wrote."""
    import threading
    import time

    from data.rebuild import preparing_lock
    from training.runlock import exclusive

    out = tmp_path / "digits"
    got = {}
    with exclusive(preparing_lock(out), "unused"):          # another process is preparing digits ...
        t = threading.Thread(target=lambda: got.update(r=ensure_prepared("digits", tmp_path)))
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and not out.exists()             # ... so this run waits instead of writing too
        d = load_builtin("digits")
        prepare_arrays(out, "digits", {"train": d["train"], "test": d["test"]}, d["class_names"], d["source"],
                       split_rule=d["split_rule"])
        written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t.join(60)
    assert "waiting for another process preparing" in capsys.readouterr().out
    assert got["r"][1] == out and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written   # not rewritten
