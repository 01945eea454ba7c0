"""Images -> VAE latents -> sharded ArrayRecord + meta.json, resumable (`prepare_data.py source=... vae=...`).

Pipeline per shard: read `shard_size` source images (folder layouts in data/folders.py, or a built-in set) ->
resize + centre-crop -> optionally also the horizontally flipped image (stored as the next record) -> VAE encode
in batches (data/vae.py, whose docstring defines the latent convention) -> float16/float32 records
{"x": (h, w, c), "label"} -> written by data.prepare's atomic shard writer, then renamed to its final name.

Resume: `<out>/.prepare-state.json` holds a fingerprint of the plan (source files with their labels and captions,
class names, VAE, resolution, flip, dtype, shard size) and, per finished shard, its record/skip counts and channel
statistics, and its source files' bytes. A re-run with the same plan skips the finished shards that are still intact
and encodes the rest (an interrupted run, or a finished set that lost a shard); the shards it writes are bitwise
identical to an uninterrupted run's (same batches, same order). A different plan starts over; a source copied
(`cp -r`, elsewhere) or touched keeps its shards when its files hold their bytes (data/encode_plan.py).
meta.json is written last.

Corrupt images are skipped with a warning and counted (per split in meta.json, `skipped`); the run continues.
"""

import json
import math
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data.meta import META_FILE, combine_stats, load_meta, shard_stats, write_meta
from data.encode_plan import (builtin_items, changed_settings, content_key, fingerprint, folder_items,
                              recorded_vae, refuse_other_plan, same_content, shard_digest, vae_identity)
from data.prepare import _write_shards, clear_set, set_meta, shard_name
from training.errors import UserError
from training.files import atomic_write, write_json

STATE_FILE = ".prepare-state.json"
CAPTIONS_DIR = ".captions"   # each finished shard's captions (JSON lines), beside the state rather than inside it
SHARD_SIZE = 4096        # source images per shard (x2 records with hflip copies)
# How images are read (data.folders.open_image), kept in the resume state: 2 = photos turned upright by their EXIF
# orientation (2026-12-06); an encode state without it is version 1. Raise it whenever reading changes pixels.
READER_VERSION = 2


def shard_intact(path: Path, records: int) -> bool:
    """The finished shard is there and holds the records the state counted (reads only its index)."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        return False
    try:   # a truncated or overwritten file: not ok(), or an exception (from close(), even)
        reader = ArrayRecordReader(str(path))
        try:
            return reader.ok() and reader.num_records() == records
        finally:
            reader.close()
    except Exception:
        return False


def _load_meta_or_none(out_dir: Path) -> dict | None:
    try:
        return load_meta(out_dir)
    except UserError:   # unreadable: it is simply written again
        return None


def _meta_agrees(meta: dict, state: dict, jobs: list) -> bool:
    """meta.json lists exactly the planned shards with the counts the state holds (else it is written again)."""
    planned = {}
    for split, i, n, _ in jobs:
        planned.setdefault(split, []).append(shard_name(split, i, n))
    want = {split: {"files": names, "num_records": sum(state["shards"][nm]["records"] for nm in names)}
            for split, names in planned.items()}
    have = meta.get("splits")
    return isinstance(have, dict) and set(have) == set(want) and all(
        isinstance(have[s], dict) and {k: have[s].get(k) for k in ("files", "num_records")} == want[s] for s in want)


def _start_over(out_dir: Path, fp: str, plan: dict, items: dict, weights: str | None) -> dict:
    """An empty set and a fresh resume state for this plan, read by today's image reader, with the source's content
    key (data.encode_plan.content_key: without its place or times) and the VAE's weights_fingerprint (recorded_vae)."""
    clear_set(out_dir)
    shutil.rmtree(out_dir / CAPTIONS_DIR, ignore_errors=True)
    state = {"fingerprint": fp, "plan": plan, "content": content_key(plan, items), "reader": READER_VERSION,
             "vae_weights": weights, "shards": {}}
    _save_state(out_dir, state)
    return state


def _save_state(out_dir: Path, state: dict) -> None:
    write_json(out_dir / STATE_FILE, state, indent=None)


def _captions_done(out_dir: Path, info: dict) -> bool:
    return "captions_file" not in info or (out_dir / CAPTIONS_DIR / info["captions_file"]).is_file()


def _caption_lines(out_dir: Path, info: dict) -> list[str]:
    """A finished shard's caption lines, from its file (or, in a state written before those files, the state)."""
    if "captions_file" in info:
        text = (out_dir / CAPTIONS_DIR / info["captions_file"]).read_text(encoding="utf-8")
        return [line + "\n" for line in text.split("\n") if line]   # not splitlines(): U+2028 may sit in a caption
    return [json.dumps(c) + "\n" for c in info.get("captions", [])]


def prepare_latents(source: str, vae, out_dir, **settings) -> dict:
    """Encode `source` with `vae` into `out_dir` (shards + meta.json); returns the meta. One process at a time per
    `out_dir` (the set's preparing lock; another waits): two encodes into one folder deleted each other's scratch
    folder and overwrote each other's resume state.

    **Arguments:**
    - `source`: a folder in one of data/folders.py's layouts, or a built-in data set name (`fashion_mnist`,
      `digits`: its own train/test splits, at its native resolution unless `resolution` is given).
    - `vae`: a `data.vae.Vae` (see `data.vae.load_vae`).
    - `resolution`: square image size after resize + centre crop (required for folders).
    - `hflip`: also store the latent of each horizontally flipped train image (as the next record); latents
      cannot be flipped on the fly.
    - `dtype`: stored latent dtype (`float16` or `float32`).
    - `sample`: store a posterior sample instead of the posterior mean.
    - `force`: encode every shard again even where the set matches; what is there is removed only after the source
      and the VAE have been checked (a typo in either leaves the old set as it was).
    - `on_shard`: called with the shard name after each shard is finished (tests use it to interrupt).
    - `rebuilding`: out_dir is a stopped force=true rebuild's unfinished new set (data.rebuild.rebuild_keeping_old):
      its shards resume if they were made with these settings, and it begins anew (not refused) if not.
    """
    from data.rebuild import preparing_lock
    from training.runlock import exclusive

    out_dir = Path(out_dir)
    with exclusive(preparing_lock(out_dir), f"waiting for another process encoding into {out_dir} ..."):
        return _prepare_latents(source, vae, out_dir, **settings)


def _prepare_latents(source: str, vae, out_dir: Path, *, resolution: int | None = None, hflip: bool = False,
                     batch_size: int = 64, shard_size: int = SHARD_SIZE, dtype: str = "float16",
                     sample: bool = False, seed: int = 0, workers: int = 4, progress: bool = True,
                     on_shard=None, force: bool = False, rebuilding: bool = False) -> dict:
    from data.builtin import BUILTIN_NAMES, BUILTIN_SPLITS

    again = dict(resolution=resolution, hflip=hflip, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                 sample=sample, seed=seed, workers=workers, progress=progress, on_shard=on_shard)
    if dtype not in ("float16", "float32"):
        raise UserError(f"latent dtype must be float16 or float32, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise UserError("shard_size and batch_size must be >= 1")
    out_dir = Path(out_dir)
    is_builtin = str(source) in BUILTIN_NAMES and not Path(str(source)).is_dir()
    if is_builtin:
        items, class_names, src_desc, resolution = builtin_items(str(source), resolution, vae.in_channels)
        layout = "builtin"
    else:
        if not resolution:
            raise UserError("encoding a folder needs resolution=<size> (images are resized and centre-cropped to it)")
        items, class_names, src_desc, layout = folder_items(source, int(resolution), vae.in_channels)
    resolution = int(resolution)
    latent_shape = vae.latent_shape(resolution, resolution)
    if min(latent_shape[:2]) < 2:   # e.g. digits' 8x8 through an SD VAE: 1x1 latents no patch size can split
        f = max(resolution // max(latent_shape[0], 1), 1)
        raise UserError(f"{resolution}x{resolution} images give {latent_shape[0]}x{latent_shape[1]} latents with this "
                        f"VAE (it downsamples {f}x), too few for any patch: pass resolution={2 * f} or more (images "
                        f"are resized), or train on the pixels")
    # Version 2: captions and class names joined the fingerprint. A set prepared under version 1 therefore no
    # longer matches and is re-encoded once, from scratch (its old captions may be stale; nothing tells).
    plan = {"version": 2, "source": src_desc, "layout": layout, "resolution": resolution, "hflip": bool(hflip),
            "dtype": dtype, "sample": bool(sample), "seed": int(seed), "shard_size": int(shard_size),
            "batch_size": int(batch_size), "vae": vae_identity(vae), "class_names": list(class_names)}
    if vae.dtype != "float32":   # only when not the default, so that sets encoded before this key keep their plan
        plan["vae_dtype"] = vae.dtype
    jobs = []   # (split, shard index, n shards, example indices)
    for split, it in items.items():
        n = max(1, math.ceil(it.n / shard_size))
        jobs += [(split, i, n, idx) for i, idx in enumerate(np.array_split(np.arange(it.n), n))]

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    try:
        state = json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        pass
    weights = vae.weights
    same = None if force else recorded_vae(out_dir, state, plan, weights)
    if same is not None:   # the VAE copied elsewhere (each node's scratch disk) or touched: judged as the recorded one
        print(f"the VAE {vae.name} has the config and weights {out_dir} was encoded with: the same VAE", flush=True)
        plan = {**plan, "vae": same}
    fp = fingerprint(plan, items)   # (every example's id, label and caption: seconds at ImageNet size, so once)
    kept = bool(state.get("shards")) or (out_dir / META_FILE).exists()   # an encode stopped before its first shard
    kept = kept and not rebuilding   # keeps nothing, nor a rebuild's new set (the old one waits aside): begun anew
    if not force and kept and (state.get("fingerprint", fp) != fp or not state):
        # Something else is there: a set or an encode with other settings is refused; the same settings over an
        # edited source (images, labels, captions, class names) are the same command, encoded again.
        diff = changed_settings(state.get("plan"), plan)
        if set(diff) <= {"source"} and state.get("plan") and same_content(state, plan, items, jobs, shard_name):
            # a `touch`, a `cp -r`, the source copied elsewhere: the same files, so the shards stay (an ImageNet
            # encode is hours); the state records where they are now, and the next run is the stat pass again
            print(f"same bytes, labels and captions: {out_dir} keeps its shards", flush=True)
            state.update(fingerprint=fp, plan=plan)
            _save_state(out_dir, state)
        else:
            if diff or not state.get("plan"):
                refuse_other_plan(out_dir, diff)
            print(f"{source}: images, labels or captions changed since {out_dir} was encoded: encoding it again",
                  flush=True)
            if (out_dir / META_FILE).exists():
                # A complete set: it waits aside until its replacement is complete, and comes back if the encode
                # fails or is stopped, as with force=true.
                from data.rebuild import rebuild_keeping_old
                return rebuild_keeping_old(out_dir, lambda: prepare_latents(source, vae, out_dir, force=True, **again))
    if force or state.get("fingerprint") != fp:   # a new set (or force): nothing can be reused
        state = _start_over(out_dir, fp, plan, items, weights)
    # Finished shards are reused only while intact: a deleted or damaged one is encoded again, and only it.
    done = {name for name, info in state["shards"].items()
            if shard_intact(out_dir / name, info["records"]) and _captions_done(out_dir, info)}
    if (out_dir / META_FILE).exists():
        meta = _load_meta_or_none(out_dir)
        if meta is not None and len(done) == len(jobs) and _meta_agrees(meta, state, jobs):
            print(f"{out_dir} is already prepared with this source, VAE and settings", flush=True)
            return meta
    if done and len(done) < len(jobs) and state.get("reader", 1) != READER_VERSION:
        # Shards to write now would read some images (rotated photos) otherwise than the finished ones did: the set
        # would hold both. A complete set is left as it is (one reader throughout); this one is encoded whole.
        print(f"{out_dir}: its finished shards were read by an older image reader (photos' EXIF orientation not "
              f"applied): encoding all of it again, so that every image is read alike", flush=True)
        state, done = _start_over(out_dir, fp, plan, items, weights), set()
    elif (out_dir / META_FILE).exists():
        print(f"{out_dir} was prepared with these settings but " + (
            f"{len(jobs) - len(done)} of {len(jobs)} shards are missing or damaged: encoding only those"
            if len(done) < len(jobs) else "its meta.json does not match the shards: writing it again"), flush=True)
        (out_dir / META_FILE).unlink()
    for junk in list(out_dir.glob(".*.tmp-*")) + list(out_dir.glob(".work-*")):   # leftovers of an interruption
        shutil.rmtree(junk) if junk.is_dir() else junk.unlink()

    np_dtype = np.dtype(dtype)
    todo_images = sum(len(j[3]) for j in jobs if shard_name(j[0], j[1], j[2]) not in done)
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} shards already written", flush=True)
    bar = _bar(todo_images, progress)
    scratch = out_dir / f".work-{os.getpid()}"
    t0, n_img = time.perf_counter(), 0
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for split, i, n, idx in jobs:
            name = shard_name(split, i, n)
            if name in done:
                continue
            it = items[split]
            flip = hflip and split == "train"
            xs, ys, caps, shas, skipped = [], [], [], [], 0
            for k in range(0, len(idx), batch_size):
                chunk = idx[k:k + batch_size]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    imgs, got_shas = zip(*pool.map(it.load, chunk))
                shas += got_shas
                for w in caught:
                    warnings.warn(str(w.message), stacklevel=1)
                keep = [j for j, a in zip(chunk, imgs) if a is not None]
                skipped += len(chunk) - len(keep)
                imgs = [a for a in imgs if a is not None]
                if imgs:
                    batch = np.stack(imgs)
                    z = vae.encode(batch, batch_size=batch_size, sample=sample, seed=seed + int(chunk[0]))
                    if flip:
                        zf = vae.encode(batch[:, :, ::-1], batch_size=batch_size, sample=sample,
                                        seed=seed + 7919 + int(chunk[0]))
                        z = np.stack([z, zf], 1).reshape(-1, *z.shape[1:])   # original, flipped, original, ...
                    xs.append(z.astype(np_dtype))
                    rep = 2 if flip else 1
                    ys += [it.labels[j] for j in keep for _ in range(rep)]
                    if it.captions is not None:
                        caps += [{"file": it.ids[j], "caption": it.captions[j], "flipped": bool(r)}
                                 for j in keep for r in range(rep)]
                n_img += len(chunk)
                bar.update(len(chunk))
                bar.set_postfix(img_s=f"{n_img / max(time.perf_counter() - t0, 1e-9):.1f}", skipped=skipped)
            x = np.concatenate(xs) if xs else np.zeros((0, *latent_shape), np_dtype)
            # data.prepare's atomic writer (temp name, then rename) into a scratch folder, then one more rename to
            # the shard's final name: a shard file exists only when complete. A shard whose images were all
            # undecodable is written empty, so the file count stays fixed.
            scratch.mkdir(exist_ok=True)
            (tmp_name,) = _write_shards(scratch, split, x, np.asarray(ys, np.int64), 1)
            os.rename(scratch / tmp_name, out_dir / name)
            info = {"records": len(x), "skipped": skipped, "stats": shard_stats(x) if len(x) else {"count": 0}}
            digest = shard_digest(it, idx, shas)   # what a copy of the source must hold to keep it (same_content)
            if digest is not None:
                info["bytes"] = digest
            if caps:   # in a file of the shard's own: kept in the state, every save rewrote all of them (N^2 in all)
                (out_dir / CAPTIONS_DIR).mkdir(exist_ok=True)
                with atomic_write(out_dir / CAPTIONS_DIR / f"{name}.jsonl") as tmp:
                    Path(tmp).write_text("".join(json.dumps(c) + "\n" for c in caps), encoding="utf-8")
                info["captions_file"] = f"{name}.jsonl"
            state["shards"][name] = info
            _save_state(out_dir, state)
            if on_shard is not None:
                on_shard(name)
    bar.close()
    shutil.rmtree(scratch, ignore_errors=True)

    meta_splits = {}
    for split in items:
        names = [shard_name(s, i, n) for s, i, n, _ in jobs if s == split]
        meta_splits[split] = {"files": names, "num_records": sum(state["shards"][nm]["records"] for nm in names),
                              "skipped": sum(state["shards"][nm]["skipped"] for nm in names)}
        lines = [line for nm in names for line in _caption_lines(out_dir, state["shards"][nm])]
        if lines:   # captions layout: one line per record, in record order (stage 2 computes text features from it)
            with open(out_dir / f"captions-{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(lines)
    if meta_splits["train"]["num_records"] == 0:
        raise UserError(f"no decodable training images in {source}: every file was skipped")
    mean, std = combine_stats([state["shards"][nm]["stats"] for nm in meta_splits["train"]["files"]])
    skipped = sum(v["skipped"] for v in meta_splits.values())
    if skipped:
        warnings.warn(f"{skipped} undecodable image(s) skipped (counted per split in meta.json)", stacklevel=2)
    enc = dict(vae.info(), resolution=resolution, hflip_copies=bool(hflip), posterior="sample" if sample else "mean",
               layout=layout, vae_dtype=vae.dtype)
    if same is not None:   # a copy of the recorded VAE: the set names the one it was encoded with, as before (the
        enc["vae"] = same["name"]   # runs trained on it hold that name in their data identity); DIT_VAE_DIR serves
    if is_builtin:
        enc["pixels"] = str(source)   # the pixel data set these latents came from (evaluation decodes against it)
        enc["pixels_split"] = BUILTIN_SPLITS[str(source)]   # ... and how it was cut (its test images must be unseen)
    meta = set_meta(out_dir.name, src_desc, latent_shape, dtype, class_names, meta_splits, mean, std, encoder=enc)
    write_meta(out_dir, meta)
    dt = time.perf_counter() - t0
    print(f"encoded {n_img} images in {dt:.1f} s ({n_img / max(dt, 1e-9):.1f} images/s), {skipped} skipped", flush=True)
    return meta


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True, disable=not enabled, mininterval=1.0)
