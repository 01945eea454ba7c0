"""Write a data set as ArrayRecord shards plus meta.json (layout in CONTRACTS.md), and prepare built-ins on demand.

Each shard is written under a temporary name and renamed when complete; meta.json is written last, so a data set
directory with meta.json is always complete and an interrupted preparation is simply redone.
"""

import math
import os
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data.builtin import BUILTIN_NAMES, BUILTIN_SPLITS, LEGACY_SPLITS, is_builtin_copy, load_builtin
from data.meta import META_FILE, META_FORMAT_VERSION, channel_stats, load_meta, prepare_hint, write_meta
from data.rebuild import (_set_aside, prepared_for_reading, preparing_lock, rebuild_keeping_old,
                          restore_interrupted_rebuild)
from data.records import ALLOWED_DTYPES, encode_record
from training.errors import UserError, storage_reason
from training.runlock import exclusive

RECORDS_PER_SHARD = 7500      # Fashion-MNIST: 8 train shards, 2 test shards


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.array_record"


def _check_splits(splits: dict, class_names: list) -> tuple:
    if "train" not in splits:
        raise UserError("a data set needs a 'train' split (its statistics define the normalisation)")
    shapes = set()
    for split, (x, y) in splits.items():
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype.name not in ALLOWED_DTYPES:
            raise UserError(f"split {split!r}: x must be a numeric array (N, H, W, C), got "
                            f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"split {split!r}: labels must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise UserError(f"split {split!r}: labels must lie in [0, {len(class_names)})")
        shapes.add((x.shape[1:], x.dtype.name))
    if len(shapes) != 1:
        raise UserError(f"all splits must share one example shape and dtype, got {sorted(shapes)}")
    return shapes.pop()


def _write_shards(out_dir: Path, split: str, x: np.ndarray, y: np.ndarray, n_shards: int,
                  text: dict | None = None) -> list[str]:
    """text (stage 2): {"text": (N, T, E), "mask": (N, T), "caption": [N str]}, stored with each record."""
    n_shards = max(1, min(n_shards, len(x)))
    names = []
    # Contiguous chunks in record order, so reading the shards in order gives back the split in order.
    for i, idx in enumerate(np.array_split(np.arange(len(x)), n_shards)):
        names.append(write_shard(out_dir, shard_name(split, i, n_shards), x, y, idx, text))
    return names


def clear_set(out_dir: Path) -> None:
    """Before writing a set into out_dir: its meta.json goes first (the set is incomplete from now until the new meta
    lands), then the shards of an earlier preparation (other counts would leave stale ones)."""
    (out_dir / META_FILE).unlink(missing_ok=True)
    for old in list(out_dir.glob("*-of-*.array_record")) + list(out_dir.glob(".*.tmp-*")):   # + a killed write's
        old.unlink()


def captioned_record(x: np.ndarray, label: int, states: np.ndarray, mask: np.ndarray, caption: str) -> bytes:
    """A stage-2 record: the example, its caption's token states and mask, and the caption itself."""
    return encode_record({"x": x, "text": states, "mask": mask}, label=int(label), caption=str(caption))


def write_shard(out_dir: Path, name: str, x: np.ndarray, y: np.ndarray, idx, text: dict | None = None) -> str:
    """Records idx of (x, y[, text]) as the shard `name` (write_records)."""
    if text is None:
        return write_records(out_dir, name, (encode_record({"x": x[j]}, label=int(y[j])) for j in idx))
    return write_records(out_dir, name, (captioned_record(x[j], y[j], text["text"][j], text["mask"][j],
                                                          text["caption"][j]) for j in idx))


def write_records(out_dir: Path, name: str, records) -> str:
    """Encoded records (an iterable, consumed as written) as the shard `name`: written under a temporary name,
    renamed when complete. If making or writing the records fails (an unreadable image half-way through a folder, a
    full disk), the partial file goes, rather than stay behind as gigabytes of debris; a full disk is one line."""
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    w = ArrayRecordWriter(str(tmp), "group_size:1")   # group size 1: cheap random access for shuffled reads
    done = False
    try:
        try:
            for r in records:
                w.write(r)
        finally:
            w.close()   # flushes the last chunk: a full disk often shows here, not at write()
        os.rename(tmp, out_dir / name)
        done = True
    except RuntimeError as e:   # ArrayRecord reports a failed write(2) as RuntimeError("... No space left on device")
        reason = storage_reason(e)
        if reason is None:
            raise
        raise UserError(f"writing {out_dir / name} failed ({reason}): free disk space there (or choose another "
                        "data.root / out=), then run the same command again") from None
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    return name


def prepare_arrays(out_dir, name: str, splits: dict, class_names: list, source: str, encoder=None,
                   num_shards: dict | int | None = None, text: dict | None = None, text_meta: dict | None = None,
                   split_rule: str | None = None) -> dict:
    """Write `splits` {split: (x (N,H,W,C), y (N,))} into `out_dir` as shards + meta.json; returns the meta.

    num_shards: per split (dict) or for all splits (int); default one shard per RECORDS_PER_SHARD records.
    text (stage 2): {split: {"text", "mask", "caption"}} cached caption features; text_meta goes to meta["text"]
    ({"encoder", "dim", "max_tokens", ...}). split_rule: how train and test were cut (built-ins: BUILTIN_SPLITS),
    kept in meta["split_rule"].
    """
    out_dir = Path(out_dir)
    shape, dtype = _check_splits(splits, class_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_set(out_dir)
    meta_splits = {}
    for split, (x, y) in splits.items():
        n = num_shards.get(split) if isinstance(num_shards, dict) else num_shards
        n = n or math.ceil(len(x) / RECORDS_PER_SHARD)
        files = _write_shards(out_dir, split, x, np.asarray(y), n, None if text is None else text[split])
        meta_splits[split] = {"files": files, "num_records": len(x)}
    meta = set_meta(name, source, shape, dtype, class_names, meta_splits, *channel_stats(splits["train"][0]),
                    encoder=encoder)
    if split_rule is not None:
        meta["split_rule"] = split_rule
    if text is not None:
        meta["text"] = dict(text_meta or {})
    write_meta(out_dir, meta)
    return meta


def set_meta(name: str, source: str, shape, dtype: str, class_names: list, splits: dict, mean, std,
             encoder: dict | str | None = None) -> dict:
    """meta.json of a set (CONTRACTS.md) from its train split's channel statistics: pixels (uint8) map to [-1, 1]
    by a fixed affine, independent of the data; latents and features are standardised per channel."""
    c = len(mean)
    if dtype == "uint8":
        shift, scale = [127.5] * c, [1 / 127.5] * c
    else:
        shift, scale = [float(m) for m in mean], [1.0 / s if s > 0 else 1.0 for s in std]
    return {"format_version": META_FORMAT_VERSION, "name": name, "source": source, "encoder": encoder,
            "shape": list(shape), "dtype": dtype, "num_classes": len(class_names), "class_names": list(class_names),
            "splits": splits, "channel_mean": [float(m) for m in mean], "channel_std": [float(s) for s in std],
            "shift": shift, "scale": scale}


def split_rule_of(meta: dict) -> str:
    """How a prepared set's train and test were cut: its own `split_rule`, or for latents of a built-in set the rule of
    the pixel set they were encoded from. Sets prepared before meta recorded it: what that built-in held then
    (LEGACY_SPLITS)."""
    enc = meta.get("encoder") or {}
    if enc.get("pixels"):
        return enc.get("pixels_split", LEGACY_SPLITS.get(enc["pixels"], ""))
    return meta.get("split_rule", LEGACY_SPLITS.get(meta.get("name"), ""))


ADDED_LATER = ("encoder", "text")   # data_identity keys that older checkpoints do not hold
# What a captioned set's features were made from (data.text_reuse.request), without paths: a folder or latents that
# moved are the same data, other captions (their hash) or another encoder are not.
TEXT_IDENTITY = ("kind", "limit", "size", "text_encoder", "text_encoder_weights", "max_tokens", "captions_sha256",
                 "latents_sha256")


def data_identity(meta: dict) -> dict:
    """What a run's checkpoints record about the data set they were trained on (saved with the config), so that a
    resume or an evaluation on a different copy is refused: counts, shape, how train and test were cut, and for
    latents the autoencoder and its scaling (the same images re-encoded by another VAE are other data)."""
    ident = {"name": meta.get("name"), "shape": list(meta.get("shape", [])), "dtype": meta.get("dtype"),
             "num_classes": meta.get("num_classes"), "split_rule": split_rule_of(meta),
             "records": {s: int(v.get("num_records", 0)) for s, v in sorted(meta.get("splits", {}).items())}}
    enc = meta.get("encoder") or {}
    if enc.get("vae"):
        ident["encoder"] = {"vae": enc.get("vae"), "shift": meta.get("shift"), "scale": meta.get("scale")}
    text = meta.get("text")
    if isinstance(text, dict):   # stage 2: the same record count re-prepared from other captions is other data
        request = text.get("request") or {}
        ident["text"] = {"encoder": text.get("encoder"), "dim": text.get("dim"), "max_tokens": text.get("max_tokens"),
                         **{k: request[k] for k in TEXT_IDENTITY if k in request}}
    return ident


def data_mismatch(saved_config: dict, meta: dict, keys=None) -> str | None:
    """None when a run (its saved config) was trained on this copy of the data, else what differs, in words; `keys`:
    only these parts of the identity (sample.py's decoding needs encoder, shape and dtype alone). Runs saved before
    the identity was recorded are checked on the split rule alone: a built-in set's copies then held LEGACY_SPLITS
    (only digits' differs from today's)."""
    now = data_identity(meta)
    was = saved_config.get("data_identity")
    if was is None:
        was = dict(now)
        if (saved_config.get("data") or {}).get("name") == now["name"] and now["name"] in LEGACY_SPLITS:
            was["split_rule"] = LEGACY_SPLITS[now["name"]]
    # a key recorded only by later code is not held against a run saved before it
    diff = [k for k in now if was.get(k) != now[k] and (k in was or k not in ADDED_LATER) and k in (keys or now)]
    return ", ".join(_difference(k, was.get(k), now[k]) for k in diff) or None


def _difference(key: str, was, now) -> str:
    """One identity key's change in words; of a dict (the encoder, the captions) only the entries that differ, and
    a hash by its first 12 digits, so the error stays one readable line."""
    if isinstance(was, dict) and isinstance(now, dict):
        return ", ".join(_difference(f"{key}.{k}", was.get(k), now.get(k))
                         for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
    return f"{key}: run {_short(was)!r} vs now {_short(now)!r}"


def _short(value):
    return value[:12] + "..." if isinstance(value, str) and len(value) == 64 else value   # a sha256 in hex


def ensure_prepared(name: str, root, held=None) -> tuple[dict, Path]:
    """(meta, dir) of `<root>/<name>`, preparing a built-in data set on first use, and again when the copy there was
    cut differently from today's split (it is derived from files the machine keeps, so nothing is lost). `held` (an
    ExitStack): the set is held for reading until it closes (data.rebuild.reading); no rebuild replaces it meanwhile."""
    out_dir = Path(root) / name

    def ready():
        if not (out_dir / META_FILE).exists():
            if name not in BUILTIN_NAMES:
                raise UserError(f"no prepared data set at {out_dir}: {prepare_hint(out_dir)}")
            return None
        meta = load_meta(out_dir)
        return meta if not is_builtin_copy(name, meta) or split_rule_of(meta) == BUILTIN_SPLITS[name] else None

    def make():
        d = load_builtin(name)
        prepare_arrays(out_dir, name, {"train": d["train"], "test": d["test"]}, d["class_names"], d["source"],
                       split_rule=d["split_rule"])

    def build():
        if (out_dir / META_FILE).exists():   # a complete set: replaced as force=true does, refused while it is read
            print(f"{out_dir} holds the old split of {name} ({split_rule_of(load_meta(out_dir))}); re-preparing it "
                  f"with {BUILTIN_SPLITS[name]}", flush=True)
            return rebuild_keeping_old(out_dir, make)
        print(f"preparing built-in data set {name!r} in {out_dir} ...", flush=True)
        make()

    prepare = lambda: prepare_once(out_dir, ready, build)   # noqa: E731
    return (prepare() if held is None else prepared_for_reading(out_dir, prepare, held)), out_dir


def prepare_once(out_dir: Path, ready, build) -> dict:
    """The meta of `out_dir`: `ready()` (a usable meta, or None), else `build()` and the meta it wrote. Building runs
    under a lock beside the set (a rebuild may replace the folder itself), and `ready()` is asked again once the lock
    is held: runs started together prepare the set once, and the others wait for it and reuse it."""
    if _set_aside(out_dir):
        with exclusive(preparing_lock(out_dir), f"waiting for another process rebuilding {out_dir} ..."):
            restore_interrupted_rebuild(out_dir)
    meta = ready()
    if meta is not None:
        return meta
    with exclusive(preparing_lock(out_dir), f"waiting for another process preparing {out_dir} ..."):
        meta = ready()
        if meta is not None:
            return meta
        build()
    return load_meta(out_dir)
