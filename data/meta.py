"""meta.json of a prepared data set, and the per-channel maps between stored values and model space.

The loader hands the model `x = (stored - shift) * scale` per channel (last axis); `to_stored` inverts it and
`to_uint8` additionally clips and rounds for pixel data sets. meta.json is written last and atomically, so its
presence means the data set is complete.
"""

import json
from pathlib import Path

import numpy as np

from training.errors import UserError
from training.files import write_json

META_FORMAT_VERSION = 1
META_FILE = "meta.json"
REQUIRED_KEYS = ("format_version", "name", "shape", "dtype", "num_classes", "class_names", "splits", "shift", "scale")


def write_meta(dir, meta: dict) -> None:
    """Write `<dir>/meta.json` atomically, so a crash never leaves a half-written file."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_json(dir / META_FILE, meta)


def prepare_hint(dir, meta: dict | None = None) -> str:
    """How to prepare the data set in `dir` (again), by what it is: `prepare_data.py data=<name>` rebuilds the
    built-ins and the captioned sets of a data config, but latents only come from the encode command that made them."""
    from data.builtin import BUILTIN_NAMES

    dir, meta = Path(dir), meta or {}
    vae = (meta.get("encoder") or {}).get("vae") if isinstance(meta.get("encoder"), dict) else None
    if vae:
        return (f"rerun the `python prepare_data.py source=... vae={vae} out={dir}` command that encoded it (it redoes "
                f"what is missing; force=true redoes everything)")
    if dir.name in BUILTIN_NAMES:   # force: a copy whose meta.json is there is otherwise taken as complete
        root = "" if dir.parent.name == "prepared" else f" data.root={dir.parent}"
        return f"run `python prepare_data.py data={dir.name}{root}{' force=true' if meta else ''}`"
    return (f"prepare it with the command that makes it: `python prepare_data.py data=<config>` for the built-ins "
            f"({', '.join(BUILTIN_NAMES)}) and captioned sets, `python prepare_data.py source=... vae=... out={dir}` "
            f"for latents")


def _bad_field(meta: dict) -> str | None:
    """The first meta.json field whose type or shape is wrong, in words (None: all fine). Only what the loader, the
    model and the evaluator read; a hand-edited or foreign file fails here in one line instead of deep inside them."""
    from data.records import ALLOWED_DTYPES

    shape, splits = meta["shape"], meta["splits"]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_int(v) and v > 0 for v in shape)):
        return f"shape {shape!r} is not [height, width, channels] of positive integers"
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in ALLOWED_DTYPES:
        return f"dtype {meta['dtype']!r} is not one of {', '.join(ALLOWED_DTYPES)}"
    if not (is_int(meta["num_classes"]) and meta["num_classes"] >= 1):
        return f"num_classes {meta['num_classes']!r} is not a positive integer"
    if not isinstance(meta["class_names"], list):
        return "class_names is not a list"
    for key in ("shift", "scale"):
        v = meta[key]
        if not (isinstance(v, list) and len(v) == shape[-1] and all(isinstance(a, (int, float)) for a in v)):
            return f"{key} {v!r} is not a list of {shape[-1]} numbers (one per channel)"
    if not isinstance(splits, dict):
        return "splits is not a mapping of split names"
    for name, sp in splits.items():
        if not (isinstance(sp, dict) and isinstance(sp.get("files"), list) and is_int(sp.get("num_records"))
                and all(isinstance(f, str) for f in sp["files"])):
            return f"split {name!r} is not {{files: [shard names], num_records: int}}"
    if meta.get("encoder") is not None and not isinstance(meta["encoder"], dict):
        return f"encoder {meta['encoder']!r} is not a mapping (or null, for pixels)"
    text = meta.get("text")
    if text is not None and not (isinstance(text, dict) and is_int(text.get("dim")) and is_int(text.get("max_tokens"))
                                 and text["dim"] > 0 and text["max_tokens"] > 0):
        return f"text {str(text)[:80]} is not {{encoder, dim: int, max_tokens: int, ...}} (cached caption features)"
    return None


def load_meta(dir) -> dict:
    """Read and sanity-check `<dir>/meta.json`; every problem is a one-line UserError."""
    dir = Path(dir)
    path = dir / META_FILE
    hint = prepare_hint(dir)
    if not dir.is_dir():
        raise UserError(f"no prepared data set at {dir}: {hint}")
    if not path.is_file():
        raise UserError(f"{dir} has no {META_FILE} (not prepared, or preparation was interrupted): {hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): {hint}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object: {hint}")
    hint = prepare_hint(dir, meta)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path} has no valid format_version: {hint}")
    if version > META_FORMAT_VERSION:
        raise UserError(f"{path} has format_version {version} but this project reads up to {META_FORMAT_VERSION}: "
                        f"upgrade the project, or {hint} to re-prepare it")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: {hint}")
    bad = _bad_field(meta)
    if bad:
        raise UserError(f"{path}: {bad}: {hint}")
    return meta


def _affine(meta: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(meta["shift"], np.float32), np.asarray(meta["scale"], np.float32)


def to_model(x_stored: np.ndarray, meta: dict) -> np.ndarray:
    """Stored values (..., C) -> float32 model space `(x - shift) * scale`."""
    shift, scale = _affine(meta)
    return (np.asarray(x_stored, np.float32) - shift) * scale


def to_stored(x_model, meta: dict) -> np.ndarray:
    """Model space (..., C) -> float32 in stored units (not rounded or clipped; see `to_uint8` for pixels)."""
    shift, scale = _affine(meta)
    return np.asarray(x_model, np.float32) / scale + shift


def to_uint8(x_model, meta: dict) -> np.ndarray:
    """Model space -> uint8 pixels, clipped to [0, 255] and rounded; only for data sets stored as uint8."""
    if meta["dtype"] != "uint8":
        raise UserError(f"data set {meta.get('name')!r} stores {meta['dtype']}, not uint8 pixels: decode latents with "
                        "data.vae.decode_to_uint8")
    return np.clip(np.rint(to_stored(x_model, meta)), 0, 255).astype(np.uint8)


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, shape (C,)) of x (N, H, W, C), two passes in float64 chunks
    (bounded memory, and no catastrophic cancellation as with a one-pass sum of squares)."""
    n, c = len(x), x.shape[-1]
    if n == 0:
        raise UserError("cannot compute channel statistics of an empty split")
    count = x[:1].size // c * n
    total = np.zeros(c)
    for i in range(0, n, chunk):
        total += x[i:i + chunk].reshape(-1, c).astype(np.float64).sum(0)
    mean = total / count
    sq = np.zeros(c)
    for i in range(0, n, chunk):
        sq += ((x[i:i + chunk].reshape(-1, c).astype(np.float64) - mean) ** 2).sum(0)
    return mean, np.sqrt(sq / count)


def shard_stats(x: np.ndarray) -> dict:
    """Per-channel count, mean and M2 (float64) of one part of a split x (..., C), for sets written a shard at a
    time: combine_stats merges the parts (Chan et al.'s pairwise formula, no one-pass sum of squares)."""
    f = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean = f.mean(0)
    return {"count": len(f), "mean": mean.tolist(), "m2": ((f - mean) ** 2).sum(0).tolist()}


def combine_stats(stats: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel of the parts shard_stats described (empty parts, {"count": 0}, count for nothing)."""
    n, mean, m2 = 0, None, None
    for s in stats:
        if not s["count"]:
            continue
        nb, mb, m2b = s["count"], np.asarray(s["mean"]), np.asarray(s["m2"])
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        d = mb - mean
        tot = n + nb
        mean, m2, n = mean + d * nb / tot, m2 + m2b + d ** 2 * n * nb / tot, tot
    if mean is None:
        raise UserError("cannot compute channel statistics of an empty split")
    return mean, np.sqrt(m2 / n)
