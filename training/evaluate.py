"""Sample-quality metric for the built-in pixel data sets (Fashion-MNIST, digits): the project's own classifier.

No Inception weights exist offline (shared notes, data.md section 9), so we train a small CNN once per data set and
report, for generated images with the labels they were asked for:
  cond_acc   classifier argmax == requested label;  real_acc: the same classifier on the real test split
  fd         Frechet distance in the classifier's 128-d penultimate feature space ("FD", *not* FID: other network)
  fd_floor   the same distance between two disjoint, equally class-balanced sets of real test images of the same
             size: what a perfect generator would get (FD is biased upwards at small N; compare fd / fd_floor).
             Both are means over _REF_DRAWS random draws of the real sets, to steady the ratio.
The classifier is cached in `<data_dir>/classifier/` (weights via eqx.tree_serialise_leaves + classifier.json) and
retrained when the data set's fingerprint, the hyperparameters or CLASSIFIER_VERSION change.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from training.errors import UserError
from training.interrupts import DeferredInterrupt

CLASSIFIER_VERSION = 1   # bump when the architecture or training recipe changes: old caches are then retrained
_FEATURE_BATCH = 256     # fixed batch (padded) so feature extraction compiles once per image shape
_REF_DRAWS = 5           # fd and fd_floor are means over this many random real (A, B) draws: one draw's floor
                         # varied by +-26% (sd) on digits at N = 200, enough to flip a 2x bar on its own
_ADAM = optax.scale_by_adam()  # module-level, lr applied outside: one compiled train step serves every call


def _pool(h):
    """2x2 max-pool on (C, H, W); odd sizes (7x7) are padded up. A reshape-max, not reduce_window: the latter's
    gradient (select-and-scatter) made the whole train step ~2x slower on CPU."""
    h = jnp.pad(h, ((0, 0), (0, h.shape[1] % 2), (0, h.shape[2] % 2)), constant_values=-jnp.inf)
    return h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2).max((2, 4))


class Classifier(eqx.Module):
    """conv(w)-pool-conv(2w)-pool-dense128-dense(num_classes) on ONE uint8 image (H, W, C); vmap for batches.
    w = 16 by default: on Fashion-MNIST it matches w = 32 (89.7% after 3 vs 2 epochs) for ~40% less CPU time."""
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, shape, num_classes: int, *, width: int = 16, hidden: int = 128, key):
        h, w, c = shape
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(c, width, 3, padding="SAME", key=k1)
        self.conv2 = eqx.nn.Conv2d(width, 2 * width, 3, padding="SAME", key=k2)
        flat = 2 * width * (-(-h // 4)) * (-(-w // 4))   # two pools that round up: ceil(ceil(h/2)/2) == ceil(h/4)
        self.fc1 = eqx.nn.Linear(flat, hidden, key=k3)
        self.fc2 = eqx.nn.Linear(hidden, num_classes, key=k4)

    def features(self, x):
        """Penultimate (post-ReLU) activations, the space FD is measured in."""
        h = jnp.transpose(x.astype(jnp.float32) / 127.5 - 1.0, (2, 0, 1))   # channels-last -> Conv2d's (C, H, W)
        h = _pool(jax.nn.relu(self.conv1(h)))
        h = _pool(jax.nn.relu(self.conv2(h)))
        return jax.nn.relu(self.fc1(h.reshape(-1)))

    def __call__(self, x):
        return self.fc2(self.features(x))


def default_epochs(n_train: int) -> int:
    """~150k training images seen (3 epochs of Fashion-MNIST's 60k), capped at 40 epochs (digits' 1.4k: ~97%)."""
    return int(np.clip(np.ceil(150_000 / max(n_train, 1)), 1, 40))


@eqx.filter_jit
def _train_step(clf, opt_state, x, y, lr):
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(x), y).mean()
    loss, grads = eqx.filter_value_and_grad(loss_fn)(clf)
    updates, opt_state = _ADAM.update(grads, opt_state)
    return eqx.apply_updates(clf, jax.tree.map(lambda u: -lr * u, updates)), opt_state, loss


@eqx.filter_jit
def _forward(clf, x):
    f = jax.vmap(clf.features)(x)
    return f, jax.vmap(clf.fc2)(f)


def _apply(clf, x) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 (N, 128), logits (N, K)) in fixed-size padded batches."""
    feats, logits = [], []
    with DeferredInterrupt() as stop:
        for i in range(0, len(x), _FEATURE_BATCH):
            stop.check()
            b = x[i:i + _FEATURE_BATCH]
            pad = np.zeros((_FEATURE_BATCH - len(b), *x.shape[1:]), x.dtype)
            f, l = jax.device_get(_forward(clf, np.concatenate([b, pad])))
            feats.append(f[:len(b)]), logits.append(l[:len(b)])
    return np.concatenate(feats).astype(np.float64), np.concatenate(logits)


def train_classifier(x_train, y_train, x_test, y_test, *, num_classes: int, seed: int = 0, epochs: int | None = None,
                     batch_size: int = 128, lr: float = 2e-3, width: int = 16):
    """Deterministic fp32 training (numpy-seeded shuffles, cosine-decayed Adam). Returns (classifier, test accuracy)."""
    epochs = default_epochs(len(x_train)) if epochs is None else int(epochs)
    clf = Classifier(x_train.shape[1:], num_classes, width=width, key=jax.random.PRNGKey(seed))
    opt_state = _ADAM.init(eqx.filter(clf, eqx.is_inexact_array))
    rs = np.random.RandomState(seed)
    per_epoch = max(len(x_train) // batch_size, 1)   # drop the ragged last batch: one batch shape, one compile
    total = per_epoch * epochs
    with DeferredInterrupt() as stop:
        for step in range(total):
            stop.check(clf)
            if step % per_epoch == 0:
                perm = rs.permutation(len(x_train))
            idx = perm[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
            cur = np.float32(lr * 0.5 * (1 + np.cos(np.pi * step / total)))   # cosine to 0: +1-2 points at 2 epochs
            clf, opt_state, _ = _train_step(clf, opt_state, x_train[idx], y_train[idx].astype(np.int32), cur)
        stop.check(clf)
    acc = float(np.mean(_apply(clf, x_test)[1].argmax(-1) == y_test))
    return clf, acc


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the 2-Wasserstein distance between Gaussians fitted to the
    two feature sets (Dowson & Landau 1982; the formula FID uses). float64; sqrtm's tiny imaginary part is dropped
    and a tiny negative result (round-off when the sets coincide) is clamped to 0."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():   # dead ReLU units / N < 128 make S1 S2 singular: expected, checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):   # nudge both diagonals and retry
            eps = 1e-6 * np.eye(len(s1))
            covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))
    return max(fd, 0.0)


def passes_bar(result: dict, acc_frac: float = 0.9, fd_mult: float = 2.0) -> bool:
    """The project's acceptance bar: cond accuracy >= acc_frac x real accuracy and FD <= fd_mult x the real floor."""
    return result["cond_acc"] >= acc_frac * result["real_acc"] and result["fd"] <= fd_mult * result["fd_floor"]


class Evaluator:
    """Scores generated images against real *test* images only. Real sets are never topped up from train: the
    classifier has fit the train images, so their features are atypical: real train images score 1.13x the test-based
    floor on Fashion-MNIST and 1.43x on digits (`bench/metric_calibration.py`), and on digits' old writer-shifted split
    a train-based floor came out ~6x too large, i.e. far too lenient. When 2N exceeds the test split, both FDs use
    n_fd = len(test) // 2 images."""

    def __init__(self, classifier, num_classes: int, x_test, y_test, seed: int = 0):
        self.classifier, self.num_classes, self.seed = classifier, num_classes, seed
        self.x_test, self.y_test = x_test, np.asarray(y_test)
        self.f_test, logits = _apply(classifier, x_test)   # computed once; every evaluate() reuses them
        self.real_acc = float(np.mean(logits.argmax(-1) == self.y_test))

    def _two_real_sets(self, counts, rs):
        """Disjoint test-index sets A, B with counts[c] images of class c each; a class with fewer than 2 counts[c]
        images is split evenly and both sets are filled up alike, so A and B always share one distribution."""
        order = rs.permutation(len(self.y_test))
        have = np.bincount(self.y_test, minlength=len(counts))
        parts = [order[self.y_test[order] == c][:2 * min(k, have[c] // 2)] for c, k in enumerate(counts)]
        a, b = np.concatenate([p[:len(p) // 2] for p in parts]), np.concatenate([p[len(p) // 2:] for p in parts])
        short = int(counts.sum()) - len(a)
        rest = order[~np.isin(order, np.concatenate([a, b]))]
        return np.concatenate([a, rest[:short]]), np.concatenate([b, rest[short:2 * short]])

    def evaluate(self, images, labels) -> dict:
        """cond_acc, real_acc, acc_ratio, fd, fd_floor, fd_ratio, n (images scored for accuracy) and n_fd (size of the
        generated subset and of each real set in both FDs: min(n, len(test) // 2); when n is larger, each of the
        _REF_DRAWS draws takes its own random subset of the generated images)."""
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.shape[1:] != self.x_test.shape[1:] or images.ndim != 4:
            raise UserError(f"evaluate() wants uint8 images (N, {', '.join(map(str, self.x_test.shape[1:]))}), "
                            f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),) or len(images) < 2 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"evaluate() needs >= 2 images and one label in [0, {self.num_classes}) per image")
        f_gen, logits = _apply(self.classifier, images)
        cond_acc = float(np.mean(logits.argmax(-1) == labels))
        rs = np.random.RandomState(self.seed)   # fixed: the same N and labels always give the same real sets
        n_fd = min(len(images), len(self.y_test) // 2)
        sub = np.sort(rs.permutation(len(images))[:n_fd])   # all images unless the test split is too small
        rs_gen = np.random.RandomState(self.seed + 1)       # own stream: the real draws stay as they were
        fds, floors = [], []
        for k in range(_REF_DRAWS):
            if k and n_fd < len(images):   # each draw scores its own generated subset: the same expectation, less
                sub = np.sort(rs_gen.permutation(len(images))[:n_fd])   # noise, and most generated images scored
            a, b = self._two_real_sets(np.bincount(labels[sub], minlength=self.num_classes), rs)
            fds.append(frechet_distance(f_gen[sub], self.f_test[a]))
            floors.append(frechet_distance(self.f_test[b], self.f_test[a]))
        fd, floor = float(np.mean(fds)), float(np.mean(floors))
        return {"cond_acc": cond_acc, "real_acc": self.real_acc, "acc_ratio": cond_acc / self.real_acc,
                "fd": fd, "fd_floor": floor, "fd_ratio": fd / max(floor, 1e-12), "n": len(images), "n_fd": int(n_fd)}


def _fingerprint(meta: dict, x_test, y_test) -> str:
    """Meta identity + record counts + a hash of the whole test split (cheap: ~8 MB for Fashion-MNIST)."""
    h = hashlib.sha256(json.dumps([meta.get("name"), meta.get("shape"), meta.get("dtype"), meta.get("num_classes"),
                                   {s: v.get("num_records") for s, v in sorted(meta.get("splits", {}).items())}],
                                  sort_keys=True).encode())
    h.update(np.ascontiguousarray(x_test).tobytes()), h.update(np.asarray(y_test, np.int64).tobytes())
    return h.hexdigest()


def evaluator_for(meta: dict, data_dir, root, *, epochs: int | None = None) -> Evaluator:
    """The Evaluator that scores a run's samples: the data set's own or, for latents of a built-in set (meta's
    encoder names its `pixels`), the pixel set's, since samples are decoded before scoring. Training's end-of-run
    evaluation and sample.py both come here, so they cannot score a run differently."""
    import contextlib

    from data.loader import load_split

    with contextlib.ExitStack() as held:   # a run holds its own set; latents' pixel set only while it is read here
        meta, data_dir = eval_target(meta, data_dir, root, held=held)
        return get_evaluator(meta, data_dir, lambda split: load_split(meta, data_dir, split), epochs=epochs)


def eval_target(meta: dict, data_dir, root, held=None) -> tuple[dict, Path]:
    """(meta, dir) of the pixel set whose classifier scores samples of `meta`'s set, checked without training
    anything, so that training and sample.py refuse a set the classifier cannot score before their long part.
    `held`: as in data.prepare.ensure_prepared, for that pixel set."""
    from data.prepare import ensure_prepared, split_rule_of

    off = "turn the evaluation off (eval.at_end=false when training, evaluate=false in sample.py)"
    enc = meta.get("encoder") or {}
    pixels = enc.get("pixels")
    if pixels:
        pix_meta, data_dir = ensure_prepared(pixels, root, held=held)
        cut, now = split_rule_of(meta), split_rule_of(pix_meta)
        if cut != now:
            raise UserError(f"{meta.get('name')} was encoded from {pixels} split as '{cut}', but {pixels} is now split "
                            f"as '{now}', so its test images may be in these latents' training "
                            f"set: re-encode it (`python prepare_data.py source={pixels} vae=... out=...`)")
        h, w, _ = meta.get("shape") or (None, None, None)
        ds = int(enc.get("downsample", 1))
        decoded = h and [int(h) * ds, int(w) * ds, int(enc.get("image_channels", pix_meta["shape"][-1]))]
        if decoded and decoded != list(pix_meta["shape"]):
            raise UserError(f"{meta.get('name')} decodes to {decoded[0]}x{decoded[1]}x{decoded[2]} images, but the "
                            f"classifier of {pixels} scores {'x'.join(map(str, pix_meta['shape']))}: {off}, or encode "
                            f"at {pixels}'s own size and channels")
        return pix_meta, Path(data_dir)
    if meta.get("dtype") != "uint8" or enc:
        raise UserError(f"the evaluation classifier scores pixel data sets and latents of a built-in one; "
                        f"{meta.get('name')} holds {meta.get('dtype')} latents of {enc.get('vae', 'an encoder')}: "
                        f"{off}")
    return meta, Path(data_dir)


def get_evaluator(meta: dict, data_dir, load_split, *, epochs: int | None = None, seed: int = 0) -> Evaluator:
    """The data set's Evaluator; trains and caches the classifier in `<data_dir>/classifier/` on first use."""
    if meta.get("dtype") != "uint8" or meta.get("encoder"):
        raise UserError(f"the evaluation classifier scores uint8 pixel data sets; {meta.get('name')} stores "
                        f"{meta.get('dtype')} (encoder {meta.get('encoder')}): evaluate decoded images instead")
    x_test, y_test = load_split("test")
    k, shape = int(meta["num_classes"]), tuple(int(s) for s in x_test.shape[1:])
    n_train = int(meta.get("splits", {}).get("train", {}).get("num_records", 0))
    hp = {"version": CLASSIFIER_VERSION, "shape": list(shape), "num_classes": k, "width": 16, "seed": seed,
          "epochs": default_epochs(n_train) if epochs is None else int(epochs), "batch_size": 128, "lr": 2e-3}
    fp = _fingerprint(meta, x_test, y_test)
    cache = Path(data_dir) / "classifier"
    skeleton = Classifier(shape, k, width=hp["width"], key=jax.random.PRNGKey(seed))
    clf = _cached(cache, fp, hp, skeleton)
    if clf is None:   # trained by one process at a time: runs finishing together (a seed sweep) each trained it
        from training.runlock import exclusive

        # a read-only copy of the set: no lock unless one is there (exclusive), leftovers stay, kept in memory
        with exclusive(Path(data_dir) / ".classifier.lock", "waiting for another process training the evaluation "
                       f"classifier of {meta.get('name')} ..."):
            clf = _cached(cache, fp, hp, skeleton)   # the other process's, once it is done
            if clf is None:   # under the lock, a swap's leftovers are those of a process killed in it
                for left in [*cache.parent.glob(".classifier-tmp-*"), *cache.parent.glob(".classifier-old-*")]:
                    shutil.rmtree(left, ignore_errors=True)
                clf = _train_and_cache(meta, cache, fp, hp, load_split, x_test, y_test, k, seed)
    return Evaluator(clf, k, x_test, y_test, seed)


def _cached(cache: Path, fp: str, hp: dict, skeleton):
    """The cached classifier if it was trained for this data (fingerprint) and these hyperparameters, else None."""
    try:
        info = json.loads((cache / "classifier.json").read_text())
        if info["fingerprint"] == fp and info["hyperparameters"] == hp:
            clf = eqx.tree_deserialise_leaves(cache / "classifier.eqx", skeleton)   # np.load, no pickle
            same = [(a.shape, a.dtype) == (b.shape, b.dtype) for a, b in zip(jax.tree.leaves(clf),
                                                                              jax.tree.leaves(skeleton))]
            if all(same):
                return clf
    except Exception:   # noqa: BLE001 - absent, stale or corrupt cache (any failure): retrained
        pass
    return None


def _train_and_cache(meta, cache: Path, fp: str, hp: dict, load_split, x_test, y_test, k: int, seed: int):
    print(f"training the evaluation classifier for {meta.get('name')} (once, cached in {cache})", flush=True)
    x_train, y_train = load_split("train")
    t0 = time.perf_counter()
    clf, acc = train_classifier(x_train, y_train, x_test, y_test, num_classes=k, seed=seed, epochs=hp["epochs"],
                                batch_size=hp["batch_size"], lr=hp["lr"], width=hp["width"])
    info = {"fingerprint": fp, "hyperparameters": hp, "test_accuracy": acc, "train_seconds": time.perf_counter() - t0,
            "note": "FD features: penultimate layer of this classifier (training/evaluate.py); not FID"}
    # Atomic: write a temp dir beside the cache, then swap it in, so a crash never leaves half a cache.
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".classifier-tmp-", dir=cache.parent))
        eqx.tree_serialise_leaves(tmp / "classifier.eqx", clf)
        (tmp / "classifier.json").write_text(json.dumps(info, indent=1))
        old = cache.parent / f".classifier-old-{os.getpid()}"
        if cache.exists():
            os.rename(cache, old)
        os.rename(tmp, cache)
        shutil.rmtree(old, ignore_errors=True)
    except OSError:   # e.g. a read-only copy of the set: the classifier in memory serves this run
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return clf
