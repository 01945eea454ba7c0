"""training/evaluate.py on sklearn digits: classifier quality, cache behaviour, and that the metric separates real
held-out images from noise, wrong labels and mode collapse."""

import json
import os
from pathlib import Path
import time

import jax
import numpy as np
import pytest

import training.evaluate as ev_mod
from training.errors import UserError
from data.loader import load_split
from data.meta import load_meta
from training.evaluate import (Classifier, evaluator_for, frechet_distance, get_evaluator, passes_bar,
                                 train_classifier)

EPOCHS = 20   # ~95% on digits in ~1 s; the default (40, ~97%) is for real use


@pytest.fixture(scope="module")
def digits():
    """train 1000 / test 500 seen by the evaluator; 297 held-out images it never sees stand in for a perfect model."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    p = np.random.RandomState(0).permutation(len(y))
    splits = {"train": (x[p[:1000]], y[p[:1000]]), "test": (x[p[1000:1500]], y[p[1000:1500]])}
    meta = {"name": "digits", "shape": [8, 8, 1], "dtype": "uint8", "encoder": None, "num_classes": 10,
            "splits": {"train": {"num_records": 1000}, "test": {"num_records": 500}}}
    return meta, splits, (x[p[1500:]], y[p[1500:]])


@pytest.fixture(scope="module")
def evaluator(digits, tmp_path_factory):
    meta, splits, _ = digits
    return get_evaluator(meta, str(tmp_path_factory.mktemp("ds")), lambda s: splits[s], epochs=EPOCHS)


def test_classifier_shapes_and_accuracy(digits, evaluator):
    _, splits, _ = digits
    clf = evaluator.classifier
    one = jax.ShapeDtypeStruct((8, 8, 1), np.uint8)
    assert jax.eval_shape(clf.features, one).shape == (128,) and jax.eval_shape(clf, one).shape == (10,)
    big = Classifier((28, 28, 1), 10, key=jax.random.PRNGKey(0))   # the Fashion-MNIST shape builds too
    assert jax.eval_shape(big.features, jax.ShapeDtypeStruct((28, 28, 1), np.uint8)).shape == (128,)
    feats, logits = ev_mod._apply(clf, splits["test"][0][:300])   # padded batches == one example at a time
    np.testing.assert_allclose(logits[7], clf(splits["test"][0][7]), rtol=1e-4, atol=1e-4)
    assert feats.shape == (300, 128) and evaluator.real_acc > 0.9


def test_training_is_deterministic(digits):
    _, splits, _ = digits
    (x, y), (xt, yt) = splits["train"], splits["test"]
    a, acc_a = train_classifier(x[:300], y[:300], xt, yt, num_classes=10, epochs=2)
    b, acc_b = train_classifier(x[:300], y[:300], xt, yt, num_classes=10, epochs=2)
    assert acc_a == acc_b
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_cache_round_trip_and_fingerprint(digits, tmp_path, capsys, monkeypatch):
    meta, splits, _ = digits
    load = lambda s: splits[s]
    first = get_evaluator(meta, str(tmp_path), load, epochs=EPOCHS)
    assert "training the evaluation classifier for digits" in capsys.readouterr().out
    info = json.loads((tmp_path / "classifier" / "classifier.json").read_text())
    assert info["hyperparameters"]["epochs"] == EPOCHS and info["test_accuracy"] > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == [".classifier.lock", "classifier"]   # no temp dirs left

    calls = []
    real_train = ev_mod.train_classifier
    monkeypatch.setattr(ev_mod, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    t0 = time.perf_counter()
    second = get_evaluator(meta, str(tmp_path), load, epochs=EPOCHS)
    assert time.perf_counter() - t0 < 5 and calls == [] and capsys.readouterr().out == ""
    x = splits["test"][0]
    np.testing.assert_array_equal(ev_mod._apply(first.classifier, x)[1], ev_mod._apply(second.classifier, x)[1])

    changed_data = {**splits, "test": (splits["test"][0].copy(), splits["test"][1])}
    changed_data["test"][0][0, 0, 0, 0] ^= 1
    for m, ld in [({**meta, "name": "digits2"}, load), (meta, lambda s: changed_data[s]), (meta, load)]:
        get_evaluator(m, str(tmp_path), ld, epochs=EPOCHS)   # each differs from the cache just written: retrains
    assert len(calls) == 3 and capsys.readouterr().out.count("training the evaluation classifier") == 3
    (tmp_path / ".classifier-old-4194304").mkdir()   # a process killed while it swapped the cache in
    get_evaluator(meta, str(tmp_path), load, epochs=EPOCHS + 1)   # other hyperparameters: retrains too
    (tmp_path / "classifier" / "classifier.eqx").write_bytes(b"garbage")
    get_evaluator(meta, str(tmp_path), load, epochs=EPOCHS + 1)   # corrupt weights: retrains instead of crashing
    assert len(calls) == 5 and sorted(p.name for p in tmp_path.iterdir()) == [".classifier.lock", "classifier"]

    # Runs finishing together (a seed sweep) each trained it: one trains, the others wait and read its cache
    import shutil
    import threading

    from training.runlock import exclusive
    shutil.copytree(tmp_path / "classifier", tmp_path / "trained")   # what the other process will have written
    shutil.rmtree(tmp_path / "classifier")
    got = []
    with exclusive(tmp_path / ".classifier.lock", "unused"):   # held by this thread as by another process
        waiting = threading.Thread(target=lambda: got.append(get_evaluator(meta, str(tmp_path), load,
                                                                           epochs=EPOCHS + 1)))
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive() and "waiting for another process training" in capsys.readouterr().out
        os.rename(tmp_path / "trained", tmp_path / "classifier")
    waiting.join(timeout=60)
    assert got and len(calls) == 5   # the other process's classifier, not trained again


def test_real_held_out_images_score_like_real_data(digits, evaluator):
    x, y = digits[2]
    r = evaluator.evaluate(x[:200], y[:200])
    assert r["n"] == r["n_fd"] == 200
    assert 0.9 < r["acc_ratio"] < 1.1 and 0.6 < r["fd_ratio"] < 1.6 and passes_bar(r), r
    small = evaluator.evaluate(x[:100], y[:100])   # FD is noisier at N = 100: looser band
    assert 0.9 < small["acc_ratio"] < 1.1 and 0.5 < small["fd_ratio"] < 2.0 and passes_bar(small), small
    assert evaluator.evaluate(x[:100], y[:100]) == small   # the real reference sets are fixed: reproducible


def test_noise_wrong_labels_and_collapse_fail(digits, evaluator):
    x, y = digits[2][0][:100], digits[2][1][:100]
    real = evaluator.evaluate(x, y)
    noise = evaluator.evaluate(np.random.RandomState(0).randint(0, 256, x.shape).astype(np.uint8), y)
    assert noise["cond_acc"] < 0.3 and noise["fd"] > 10 * noise["fd_floor"] and not passes_bar(noise)
    shuffled = evaluator.evaluate(x, np.random.RandomState(1).permutation(y))
    assert shuffled["cond_acc"] < 0.3 and not passes_bar(shuffled)
    # FD is label-blind: the same images under shuffled labels match the same histogram, so only cond_acc catches it.
    assert shuffled["fd"] == pytest.approx(real["fd"])
    zeros = digits[2][0][digits[2][1] == 0]
    collapsed = evaluator.evaluate(np.resize(zeros, (100, 8, 8, 1)), np.sort(np.arange(100) % 10))
    assert collapsed["cond_acc"] < 0.3 and collapsed["fd"] > 5 * collapsed["fd_floor"]


def test_fd_set_size_is_capped_by_the_test_split(evaluator, digits):
    x, y = digits[2]
    r = evaluator.evaluate(x, y)   # 297 images, 500 test images: two disjoint real sets of 250, 250 generated ones
    assert r["n"] == 297 and r["n_fd"] == 250 and 0.6 < r["fd_ratio"] < 1.6, r
    want = np.bincount(y[:150], minlength=10)   # at most half of each test class: both sets can match it exactly
    a, b = evaluator._two_real_sets(want, np.random.RandomState(0))
    assert len(a) == len(b) == 150 and not set(a) & set(b)
    assert all(np.array_equal(np.bincount(evaluator.y_test[s], minlength=10), want) for s in (a, b))
    threes = x[y == 3][:20]   # 200 requests for a class the test split holds ~50 of: A and B share it evenly
    one_class = evaluator.evaluate(np.resize(threes, (200, 8, 8, 1)), np.full(200, 3))
    a, b = evaluator._two_real_sets(np.bincount(np.full(200, 3), minlength=10), np.random.RandomState(0))
    assert len(a) == len(b) == 200 and abs(np.sum(evaluator.y_test[a] == 3) - np.sum(evaluator.y_test[b] == 3)) <= 1
    assert np.isfinite(one_class["fd"]) and one_class["cond_acc"] > 0.8


def test_each_draw_scores_its_own_generated_subset(evaluator, digits, monkeypatch):
    x, y = digits[2]   # 297 images against a 500-image test split: n_fd = 250, so 47 would sit out of a single subset
    calls, real = [], ev_mod.frechet_distance
    monkeypatch.setattr(ev_mod, "frechet_distance", lambda a, b: calls.append(a) or real(a, b))
    evaluator.evaluate(x, y)
    gen = calls[0::2]   # each draw: FD(generated, A), then the floor FD(B, A)
    assert len(gen) == ev_mod._REF_DRAWS and all(len(g) == 250 for g in gen)
    assert len({row.tobytes() for g in gen for row in g}) > 280   # several subsets, not one reused five times
    calls.clear()
    evaluator.evaluate(x[:200], y[:200])   # fewer than n_fd: every draw scores all of them
    assert all(len({row.tobytes() for row in g}) == 200 for g in calls[0::2])


def test_frechet_distance_formula():
    f = np.random.RandomState(0).randn(500, 16)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(16) / 10
    assert frechet_distance(f, f + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)   # same covariance
    assert frechet_distance(f, 2 * f) == pytest.approx(np.sum(f.mean(0) ** 2) + np.trace(np.cov(f, rowvar=False)),
                                                       rel=1e-6)   # S2 = 4 S1: Tr(S1 + 4 S1 - 2 * 2 S1) = Tr(S1)
    few = np.random.RandomState(1).randn(12, 128)   # N < dim: singular covariance still gives a finite value
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-4)


def test_passes_bar():
    r = {"cond_acc": 0.81, "real_acc": 0.9, "fd": 3.9, "fd_floor": 2.0}
    assert passes_bar(r)
    assert not passes_bar({**r, "cond_acc": 0.8}) and not passes_bar({**r, "fd": 4.1})
    assert passes_bar({**r, "fd": 4.1}, fd_mult=2.5)


def test_user_errors(evaluator, digits):
    x, y = digits[2][0][:10], digits[2][1][:10]
    with pytest.raises(UserError, match="uint8"):
        evaluator.evaluate(x.astype(np.float32), y)
    with pytest.raises(UserError, match="8, 8, 1"):
        evaluator.evaluate(np.zeros((10, 28, 28, 1), np.uint8), y)
    with pytest.raises(UserError, match="label"):
        evaluator.evaluate(x, y + 10)
    with pytest.raises(UserError, match="decoded"):
        get_evaluator({"name": "lat", "dtype": "float16", "encoder": "vae", "num_classes": 10}, "/nonexistent", None)
    with pytest.raises(UserError, match="eval.at_end=false"):
        evaluator_for({"name": "lat", "dtype": "float16", "encoder": {"vae": "v"}, "num_classes": 10}, "/x", "/x")


def test_latents_of_a_builtin_set_are_scored_by_its_pixel_classifier(digits_root, tmp_path):
    # A latent set names the pixel set it encodes; training's end-of-run evaluation and sample.py (evaluate=true)
    # both come through evaluator_for, which must score decoded samples with that set's classifier (sample.py
    # used to refuse latent runs after sampling).
    from data.builtin import BUILTIN_SPLITS

    lat = {"name": "digits_lat", "dtype": "float16", "num_classes": 10,
           "encoder": {"type": "AutoencoderKL", "pixels": "digits", "pixels_split": BUILTIN_SPLITS["digits"]}}
    ev = evaluator_for(lat, tmp_path / "digits_lat", digits_root, epochs=1)
    assert (Path(digits_root) / "digits" / "classifier" / "classifier.json").is_file()
    assert not (tmp_path / "digits_lat").exists()
    pdir = Path(digits_root) / "digits"
    x, y = load_split(load_meta(pdir), pdir, "test")
    res = ev.evaluate(x[:64], y[:64])
    assert {"cond_acc", "fd", "fd_floor"} <= set(res)
    with pytest.raises(UserError, match="eval.at_end=false"):   # latents that name no pixel set: the one line
        evaluator_for({**lat, "encoder": {"type": "AutoencoderKL"}}, tmp_path, digits_root, epochs=1)
    # Latents that decode to another size or channel count than the pixel set's: refused by the check that training
    # runs at start (it failed in evaluate() after all the training and sampling)
    from training.evaluate import eval_target
    big = {**lat, "shape": [8, 8, 4], "encoder": {**lat["encoder"], "downsample": 2, "image_channels": 3}}
    with pytest.raises(UserError, match="decodes to 16x16x3 images, but the classifier of digits scores 8x8x1"):
        eval_target(big, tmp_path, digits_root)
    fits = {**lat, "shape": [4, 4, 4], "encoder": {**lat["encoder"], "downsample": 2, "image_channels": 1}}
    assert eval_target(fits, tmp_path, digits_root)[1] == pdir
    # Latents encoded from the old file-order cut: their training images overlap today's test split. Refused.
    with pytest.raises(UserError, match="re-encode"):
        evaluator_for({**lat, "encoder": {"type": "AutoencoderKL", "pixels": "digits"}}, tmp_path, digits_root,
                      epochs=1)
