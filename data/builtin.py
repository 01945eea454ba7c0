"""Built-in data sets that need no download: Fashion-MNIST (Debian package `dataset-fashion-mnist`) and
scikit-learn's 8x8 digits (shipped inside the scikit-learn wheel).

`load_builtin(name)` returns {"train": (x, y), "test": (x, y), "class_names": [...], "source": str,
"split_rule": str} with x uint8 (N, H, W, 1) and y int64. `split_rule` names how train and test were cut
(BUILTIN_SPLITS); prepared copies record it in meta.json, so a copy cut another way is noticed and re-prepared
(data/prepare.py).
"""

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from training.errors import UserError

BUILTIN_NAMES = ("fashion_mnist", "digits")
BUILTIN_SPLITS = {"fashion_mnist": "official 60000/10000",
                  "digits": "stratified random 20% test, seed 0"}
# What copies prepared before meta.json recorded `split_rule` hold. Digits' old test split was the last 20% of each
# class in file order: sklearn's file groups writers, so that held out other writers (real train digits scored 1.8x
# the FD floor, one draw in four over 2x; development_log.md, twenty-sixth session).
LEGACY_SPLITS = {"fashion_mnist": "official 60000/10000", "digits": "last 20% of each class in file order"}
_SOURCE_PREFIX = {"fashion_mnist": "Fashion-MNIST IDX files in ", "digits": "sklearn.datasets.load_digits "}


def is_builtin_copy(name: str, meta: dict) -> bool:
    """Whether a prepared meta.json is this module's copy of built-in `name` (not latents of it, not a user's own
    set that happens to share the name)."""
    return (name in _SOURCE_PREFIX and not meta.get("encoder")
            and str(meta.get("source", "")).startswith(_SOURCE_PREFIX[name]))

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file (big-endian int32 magic, `ndim` int32 sizes, then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): reinstall `dataset-fashion-mnist`") from None
    header = 4 * (1 + ndim)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise UserError(f"{path} is not an IDX file with magic number {magic}: reinstall `dataset-fashion-mnist`")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} holds {data.size} bytes of data for shape {dims}: reinstall `dataset-fashion-mnist`")
    return data.reshape(dims)


def _fashion_mnist() -> dict:
    root = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    files = [root / f for pair in _FASHION_FILES.values() for f in pair]
    if not all(f.is_file() for f in files):
        raise UserError(f"Fashion-MNIST not found in {root}: install it with "
                        "`apt-get install -y dataset-fashion-mnist` (or set FASHION_MNIST_DIR), or train on the "
                        "built-in `data=digits`")
    out = {"class_names": list(FASHION_CLASSES), "source": _SOURCE_PREFIX["fashion_mnist"] + str(root),
           "split_rule": BUILTIN_SPLITS["fashion_mnist"]}
    for split, (img, lab) in _FASHION_FILES.items():
        x, y = _read_idx(root / img, 2051, 3), _read_idx(root / lab, 2049, 1)
        if len(x) != len(y):
            raise UserError(f"{root / img} has {len(x)} images but {root / lab} has {len(y)} labels")
        out[split] = (x[..., None], y.astype(np.int64))
    return out


def digits_in_file_order() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 of sklearn's digits as (x uint8 (N, 8, 8, 1), y int64), in the file's order."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn costs ~1 s to import

    d = load_digits()
    return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None], d.target.astype(np.int64)   # 0..16 -> 0..255


def digits_test_mask(y: np.ndarray, rule: str = "random", test_fraction: float = 0.2) -> np.ndarray:
    """Which of the file-order digits are test: `test_fraction` of each class, picked at random (seed 0; the rule in
    use), or the class's last / first ones in file order (the old rule, LEGACY_SPLITS, and its mirror; kept for
    bench/metric_calibration.py). The file is grouped by writer, so a file-order cut tests on unseen writers."""
    if rule not in ("random", "file_order", "first"):
        raise ValueError(f"unknown digits split rule {rule!r}: random | file_order | first")
    rs, test = np.random.RandomState(0), np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        k = round(test_fraction * len(idx))
        if rule == "random":
            idx = rs.permutation(idx)
        test[idx[len(idx) - k:] if rule == "file_order" else idx[:k]] = True
    return test


def _digits() -> dict:
    x, y = digits_in_file_order()
    test = digits_test_mask(y)   # train keeps file order
    return {"train": (x[~test], y[~test]), "test": (x[test], y[test]), "class_names": [str(c) for c in range(10)],
            "source": _SOURCE_PREFIX["digits"] + "(8x8, values 0..16 scaled to 0..255)",
            "split_rule": BUILTIN_SPLITS["digits"]}


def load_builtin(name: str) -> dict:
    """Load a built-in data set by name (see BUILTIN_NAMES)."""
    if name == "fashion_mnist":
        return _fashion_mnist()
    if name == "digits":
        return _digits()
    raise UserError(f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN_NAMES)}")
