"""Built-in data sets that need no download: Fashion-MNIST (Debian package `dataset-fashion-mnist`) and
scikit-learn's 8x8 digits (shipped inside the scikit-learn wheel).

`load_builtin(name)` returns {"train": (x, y), "test": (x, y), "class_names": [...], "source": str} with
x uint8 (N, H, W, 1) and y int64.
"""

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from training.errors import UserError

BUILTIN_NAMES = ("fashion_mnist", "digits")

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
        raise UserError(f"Fashion-MNIST not found in {root}: install it with `apt-get install -y dataset-fashion-mnist` "
                        "(or set FASHION_MNIST_DIR), or train on the built-in `data=digits`")
    out = {"class_names": list(FASHION_CLASSES), "source": f"Fashion-MNIST IDX files in {root}"}
    for split, (img, lab) in _FASHION_FILES.items():
        x, y = _read_idx(root / img, 2051, 3), _read_idx(root / lab, 2049, 1)
        if len(x) != len(y):
            raise UserError(f"{root / img} has {len(x)} images but {root / lab} has {len(y)} labels")
        out[split] = (x[..., None], y.astype(np.int64))
    return out


def _digits(test_fraction: float = 0.2) -> dict:
    from sklearn.datasets import load_digits  # imported lazily: sklearn costs ~1 s to import

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]   # 0..16 -> 0..255
    y = d.target.astype(np.int64)
    # Deterministic stratified split with no RNG: the last `test_fraction` of each class (in file order) is test.
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[idx[len(idx) - round(test_fraction * len(idx)):]] = True
    return {"train": (x[~test], y[~test]), "test": (x[test], y[test]), "class_names": [str(c) for c in range(10)],
            "source": "sklearn.datasets.load_digits (8x8, values 0..16 scaled to 0..255)"}


def load_builtin(name: str) -> dict:
    """Load a built-in data set by name (see BUILTIN_NAMES)."""
    if name == "fashion_mnist":
        return _fashion_mnist()
    if name == "digits":
        return _digits()
    raise UserError(f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN_NAMES)}")
