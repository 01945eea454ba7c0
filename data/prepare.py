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


def ensure_prepared(name: str, root) -> tuple[dict, Path]:
    """(meta, dir) of `<root>/<name>`, preparing a built-in data set on first use, and again when the copy there was
    cut differently from today's split (it is derived from files the machine keeps, so nothing is lost)."""
    out_dir = Path(root) / name

    def ready():
        if not (out_dir / META_FILE).exists():
            if name not in BUILTIN_NAMES:
                raise UserError(f"no prepared data set at {out_dir}: {prepare_hint(out_dir)}")
            return None
        meta = load_meta(out_dir)
        return meta if not is_builtin_copy(name, meta) or split_rule_of(meta) == BUILTIN_SPLITS[name] else None

    def build():
        if (out_dir / META_FILE).exists():
            print(f"{out_dir} holds the old split of {name} ({split_rule_of(load_meta(out_dir))}); re-preparing it "
                  f"with {BUILTIN_SPLITS[name]}", flush=True)
        else:
            print(f"preparing built-in data set {name!r} in {out_dir} ...", flush=True)
        d = load_builtin(name)
        prepare_arrays(out_dir, name, {"train": d["train"], "test": d["test"]}, d["class_names"], d["source"],
                       split_rule=d["split_rule"])

    return prepare_once(out_dir, ready, build), out_dir


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


def preparing_lock(out_dir: Path) -> Path:
    """The lock file for preparing `out_dir`: beside it, since a rebuild may replace the folder itself."""
    return out_dir.parent / f".{out_dir.name}.prepare.lock"


_REBUILDING: set[Path] = set()   # old copies set aside by rebuilds running in this process


def _set_aside(out_dir: Path) -> list[Path]:
    """Old copies that `force=true` rebuilds of `out_dir` set aside (`.<name>.replaced-<pid>`), other than this
    process's own rebuild in progress."""
    real = Path(out_dir).resolve()
    def newest_first(p):   # the copy restored or resumed; one removed meanwhile (outside the lock) sorts last
        try:
            return -p.stat().st_mtime_ns
        except OSError:
            return 0
    return sorted((p for p in real.parent.glob(f".{real.name}.replaced-*") if p not in _REBUILDING), key=newest_first)


def rebuild_keeping_old(out_dir, build, resume=None):
    """force=true: the complete set (and its cached classifier) is moved aside while `build()` makes a new one in
    its place, and comes back if the rebuild fails or is interrupted (a missing source, Ctrl-C): a rebuild never
    leaves less than there was. The old copy is deleted only once the new one is complete. If the process is killed
    outright in between (kill -9, a preemption's SIGTERM), the old copy waits aside and the new set's finished
    shards stay: `resume()` (the same command again) continues that rebuild, where building from nothing again
    lost hours of encoding; other preparations of the set put the old copy back (restore_interrupted_rebuild). All
    of it runs under the set's preparing lock, so a run starting meanwhile waits instead of preparing the set too."""
    import shutil
    import sys

    out_dir = Path(out_dir)
    with exclusive(preparing_lock(out_dir), f"waiting for another process preparing {out_dir} ..."):
        target = out_dir.resolve()   # a symlinked set is rebuilt where it lives, and the link keeps pointing at it
        aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
        stopped = stopped_rebuild(out_dir) if resume is not None else None
        if stopped is not None:   # the new set's shards are in place, the old copy aside: go on from there
            os.rename(stopped, aside)
            print(f"resuming the stopped rebuild of {target}; until it is complete the old copy waits in {aside}",
                  flush=True)
        else:
            restore_interrupted_rebuild(out_dir)
            print(f"rebuilding {target}; until it is complete the old copy waits in {aside}", flush=True)
        _REBUILDING.add(aside)
        try:
            if stopped is None:
                os.rename(target, aside)
            try:
                if stopped is None:
                    target.mkdir()   # empty, so a link to it is not left dangling while build() writes through it
                result = (build if stopped is None else resume)()
            except KeyboardInterrupt:   # Ctrl-C, or a preemption's signal taken as one: as a kill, resumable
                if resume is None:
                    _put_back(target, aside)
                else:
                    print(f"rebuild of {target} stopped: the same command resumes it; until then the old copy waits "
                          f"in {aside} (anything else that prepares the set puts it back)", file=sys.stderr,
                          flush=True)
                raise
            except BaseException:
                _put_back(target, aside)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            _REBUILDING.discard(aside)
    return result


def _put_back(target: Path, aside: Path) -> None:
    import shutil
    import sys

    shutil.rmtree(target, ignore_errors=True)
    os.rename(aside, target)
    print(f"rebuild of {target} stopped: the old copy is back in place", file=sys.stderr, flush=True)


def stopped_rebuild(out_dir) -> Path | None:
    """The old copy of a rebuild killed before it finished (no live owner: call under the set's preparing lock), when
    the set in its place is that rebuild's unfinished new one: the copy to keep aside while the rebuild resumes."""
    target = Path(out_dir).resolve()
    if not target.is_dir() or (target / META_FILE).exists():
        return None
    old = [a for a in _set_aside(out_dir) if (a / META_FILE).exists()]
    return old[0] if old else None   # the copy restore_interrupted_rebuild would put back


def prepare_or_rebuild(out_dir, force: bool, before, prepare, build, resume, check=None):
    """What a prepare_data.py command does to `out_dir`, chosen under the set's lock (a second force=true meanwhile
    saw the set moved aside, took it for absent, and went its own way). Without force: prepare() (the set as it is,
    made if absent). With force: the set another process completed while this one waited, if prepare() accepts it
    (done_meanwhile; `before`: meta_stamp when the command started); else build() into an empty place, or, over a
    complete set or a stopped rebuild, rebuild_keeping_old(build, resume), after check(the old set's folder) refuses
    what a rebuild would lose."""
    out_dir = Path(out_dir)
    with exclusive(preparing_lock(out_dir), f"waiting for another process preparing {out_dir} ..."):
        if not force:
            return prepare()
        done = done_meanwhile(out_dir, before, prepare)
        if done is not None:
            return done
        stopped = stopped_rebuild(out_dir)
        if stopped is None and not (out_dir / META_FILE).exists():
            return build()
        if check is not None:
            check(stopped or out_dir)
        return rebuild_keeping_old(out_dir, build, resume=resume)


def meta_stamp(out_dir) -> tuple | None:
    """meta.json's inode, size and mtime (None when absent): taken when a force=true command starts, compared once
    it holds the set's lock (done_meanwhile). No clock is compared: a file server's may differ from this host's."""
    try:
        st = (Path(out_dir) / META_FILE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def done_meanwhile(out_dir, before, prepare):
    """A force=true (the same job submitted twice) that waited for another process, which completed the set
    meanwhile (meta.json appeared or changed since `before`): that set, if preparing without force accepts it as this
    command's (`prepare()`), instead of rebuilding it again, without its meta.json meanwhile; else None."""
    now = meta_stamp(out_dir)
    if now is None or now == before:
        return None
    try:
        result = prepare()
    except UserError:   # made otherwise than this command asks: rebuilt, as force=true says
        return None
    print(f"{out_dir} was rebuilt by another process while this one waited: kept as it is", flush=True)
    return result


def restore_interrupted_rebuild(out_dir) -> None:
    """Under the set's preparing lock, an old copy set aside by a rebuild has no live owner (the rebuild holds the
    lock until it is done, and the kernel drops it when a process is killed): it goes back in place if the set was
    left incomplete, and is deleted if the new set was completed."""
    import shutil

    target = Path(out_dir).resolve()
    for aside in _set_aside(out_dir):
        if (target / META_FILE).exists():
            shutil.rmtree(aside, ignore_errors=True)
            print(f"removed {aside}, the old copy of {target} a finished but interrupted rebuild left", flush=True)
        elif (aside / META_FILE).exists():
            shutil.rmtree(target, ignore_errors=True)
            os.rename(aside, target)
            print(f"{target}: a rebuild was killed before it finished; the complete old copy is back in place",
                  flush=True)
