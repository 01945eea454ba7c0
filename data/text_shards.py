"""Captioned records written shard by shard as they are made (stage 2's folders and latents), resumable.

Caption features are the slow part of preparing a large captioned set (a T5-sized encoder: hours on a GPU), so an
interrupted preparation keeps its finished shards: `<out>/.prepare-state.json` names the request it belongs to and
each finished shard's record count, channel statistics and (a folder's) the hash of the images it was decoded from.
A rerun of the same request writes only the shards that are missing, damaged or whose images changed since, with the
same bytes as an uninterrupted run (each shard's batches start at the shard's first record, so no feature depends on
what came before it); another request starts the set afresh.
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from training.files import write_json

SHARD_BYTES = 1 << 29   # captioned folders: at most ~512 MB of images per shard file
FEATURE_BATCH = 1024    # records made (decoded, caption features computed) and written at a time: a multiple of the
                        # text encoder's own batch (256), so the features are those of one call over the whole split
STATE_FILE = ".prepare-state.json"


def start(out_dir: Path, request: dict) -> dict:
    """The resume state of `request` in out_dir (its hash is kept, as `key`): an interrupted preparation's finished
    shards, or (another request, or none) an emptied set and a fresh state."""
    from data.prepare import clear_set

    key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict) or state.get("key") != key or not isinstance(state.get("shards"), dict):
        clear_set(out_dir)
        state = {"key": key, "shards": {}}
        write_json(out_dir / STATE_FILE, state, indent=None)
    for partial in out_dir.glob(".*.tmp-*"):   # a shard a kill cut short (finished shards are renamed into place)
        partial.unlink()
    return state


def resume_request(text_meta: dict, per_shard: int, enc) -> dict:
    """What finished shards must share to be resumed: the set's request and encoder, the shard cut, and the kind of
    device the features came from (CPU and GPU features differ in the last bits: one set holds one kind). The
    request's sources count by content (their hashes), not by where they are or their stamps (PATH_KEYS), so an
    interrupted preparation resumes on a `cp -r` of its folder or latents. A folder's images are not in it: each
    finished shard is checked against the bytes it was made from (write_split), so they are read once, when
    decoded."""
    from data.text_reuse import PATH_KEYS

    request = {k: v for k, v in (text_meta.get("request") or {}).items() if k not in PATH_KEYS}
    return {**text_meta, "request": request, "per_shard": int(per_shard),
            "device": str(getattr(enc, "device", "cpu")).split(":")[0]}


def finish(out_dir: Path) -> None:
    """Once meta.json is written the set is complete; its resume state goes."""
    (out_dir / STATE_FILE).unlink(missing_ok=True)


def write_split(out_dir: Path, state: dict, split: str, n: int, per_shard: int, chunk, enc, max_tokens: int,
                file_lines=None):
    """Records 0..n-1 of a split written as they are made, FEATURE_BATCH at a time, so memory holds one batch of
    images and caption features whatever the set's size or the shard's (all of ImageNet's caption features would not
    fit, nor 7,500 of a large text encoder's): chunk(indices) -> (x, labels, captions, lines) of the next records, in
    order, where lines are their source files' data.folders.digest_line (hashed from the bytes decoded) or None;
    file_lines(indices): the lines of a finished shard's files, read again at a resume: the shard is kept only when
    its files hold the bytes it was made from (a source edited since is written again, a `cp -r` of it resumes).
    Returns (shard names, shard_stats of each batch, the split's data.folders.bytes_digest when it has files)."""
    from data.encode import shard_intact
    from data.folders import lines_digest
    from data.meta import shard_stats
    from data.prepare import captioned_record, shard_name, write_records

    total = max(1, math.ceil(n / per_shard))
    files, stats = [], []
    names = [shard_name(split, i, total) for i in range(total)]
    done = [nm for nm in names if nm in state["shards"] and shard_intact(out_dir / nm, state["shards"][nm]["records"])]
    if done:
        print(f"resuming: {len(done)} of {total} {split} shards already written", flush=True)
    digest = hashlib.sha256() if file_lines is not None else None

    def records(idx, mine, lines):
        for lo in range(0, len(idx), FEATURE_BATCH):
            x, y, caps, made_from = chunk(idx[lo:lo + FEATURE_BATCH])
            states, mask = enc.encode(caps, max_tokens)
            states = states.astype(np.float16)
            mine.append(shard_stats(x))
            lines += made_from or []
            yield from (captioned_record(x[j], y[j], states[j], mask[j], cap) for j, cap in enumerate(caps))

    for name, idx in zip(names, np.array_split(np.arange(n), total)):   # prepare_arrays' cut, at this shard count
        if name in done and digest is not None:
            lines = _lines_or_none(file_lines, idx)
            if lines is None or lines_digest(lines) != state["shards"][name].get("bytes"):
                print(f"{name}: its source files are not those it was made from: making it again", flush=True)
                done.remove(name)
            else:
                digest.update(b"".join(lines))
        if name in done:
            files.append(name)
            stats += state["shards"][name]["stats"]
            continue
        mine, lines = [], []
        files.append(write_records(out_dir, name, records(idx, mine, lines)))
        stats += mine
        state["shards"][name] = {"records": len(idx), "stats": mine}
        if digest is not None:
            digest.update(b"".join(lines))
            state["shards"][name]["bytes"] = lines_digest(lines)
        write_json(out_dir / STATE_FILE, state, indent=None)   # small: counts, statistics and hashes, no captions
    return files, stats, None if digest is None else digest.hexdigest()


def _lines_or_none(file_lines, idx):
    try:
        return file_lines(idx)
    except OSError:   # a file gone or unreadable: the shard is made again, and that names the file
        return None
