"""What a latent encode (data/encode.py) is made from, and whether an earlier encode's state may be reused.

The plan (settings, VAE, source) and every example's id (a folder file's path, size and mtime), label and caption
make the state's fingerprint: the same fingerprint resumes, other settings are refused, an edited source is encoded
again. A `touch`, a `cp -r` or a copy of the source elsewhere changes only where the files are and their times:
each finished shard records its images' bytes (shard_digest, from the bytes the encode decoded), and a source whose
bytes (shard_bytes, read again), labels and captions are those the state recorded (same_content) is the same source,
reused as it is. A VAE copied elsewhere or touched, with the recorded config and weights, is the same VAE
(recorded_vae).
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data.meta import META_FILE
from training.errors import UserError


class Items:
    """One split of a source: n examples, each loaded as (uint8 (res, res, C) or None when undecodable, the sha256 of
    its file's bytes or None: a built-in's examples have no file)."""

    def __init__(self, n, load, labels, ids, captions=None, paths=None, names=None):
        self.n, self.load, self.labels, self.ids, self.captions = n, load, labels, ids, captions
        self.paths, self.names = paths, names   # folders: each file and its path under the source (ids add stamps)


def builtin_items(name: str, resolution: int | None, channels: int) -> tuple[dict, list, str, int]:
    from PIL import Image

    from data.builtin import load_builtin

    d = load_builtin(name)
    native = d["train"][0].shape[1]
    res = int(resolution or native)

    def loader(x):
        def load(i):
            a = x[i]
            if res != a.shape[0] or channels != a.shape[-1]:
                im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
                im = im.convert("L" if channels == 1 else "RGB").resize((res, res), Image.BICUBIC)
                a = np.asarray(im)
                a = a[..., None] if a.ndim == 2 else a
            return a, None
        return load

    items = {s: Items(len(d[s][0]), loader(d[s][0]), [int(v) for v in d[s][1]],
                       [f"{name}/{s}/{i}" for i in range(len(d[s][0]))]) for s in ("train", "test")}
    # The split joins the source, so the resume plan never mixes two cuts (meta's encoder records it: pixels_split)
    return items, d["class_names"], f'{d["source"]}; split: {d["split_rule"]}', res


def folder_items(source, resolution: int, channels: int) -> tuple[dict, list, str, str]:
    from data.folders import file_stamp, load_hashed, scan_source

    src = scan_source(source)
    root = Path(source).expanduser()
    items = {}
    for split, sp in src.splits.items():
        files = list(sp.files)
        names = [Path(os.path.relpath(p, root)).as_posix() for p in files]
        # The id is the path as listed under the source folder, symlinks not followed: a subset built from links to
        # files elsewhere is still readable, and two links to one file stay two examples. Size and mtime (of the
        # target) catch an edited image.
        items[split] = Items(len(files), lambda i, f=files: load_hashed(f[i], resolution, channels), list(sp.labels),
                             [file_stamp(p, name) for p, name in zip(files, names)], sp.captions, files, names)
    return items, src.class_names, str(root.resolve()), src.layout


def fingerprint(plan: dict, items: dict) -> str:
    """Hash of the plan and every example (id, label, caption): an edited captions.jsonl or labels file is a new
    plan (captions would otherwise stay stale in captions-<split>.jsonl)."""
    h = hashlib.sha256(json.dumps(plan, sort_keys=True).encode())
    for split in sorted(items):
        h.update(split.encode()), h.update(json.dumps(items[split].ids).encode())
        h.update(json.dumps(items[split].labels).encode()), h.update(json.dumps(items[split].captions).encode())
    return h.hexdigest()


def vae_identity(vae) -> dict:
    """Config plus the size and mtime of its weight files: a changed VAE must not resume old shards."""
    ident = {"name": vae.name, "config": {k: v for k, v in dict(vae.model.config).items() if not k.startswith("_")}}
    p = Path(vae.name)
    if p.is_dir():
        ident["files"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                                if f.suffix in (".safetensors", ".bin"))
    return json.loads(json.dumps(ident, default=str))


def recorded_vae(out_dir: Path, state: dict, plan: dict, weights: str | None) -> dict | None:
    """The VAE identity the state recorded, when the plan's VAE differs from it only in where its files are or their
    times: the same config and the same weights (training.files.weights_fingerprint `weights`, against the state's or,
    for a state from before it was kept, a complete set's meta.json). None otherwise: the old verdict stands."""
    was = (state.get("plan") or {}).get("vae")
    if not isinstance(was, dict) or was == plan["vae"] or not weights or was.get("config") != plan["vae"]["config"]:
        return None
    recorded = state.get("vae_weights")
    if recorded is None and (out_dir / META_FILE).is_file():
        try:
            recorded = (json.loads((out_dir / META_FILE).read_text()).get("encoder") or {}).get("weights_fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
    return was if recorded == weights else None


def content_key(plan: dict, items: dict) -> str:
    """fingerprint() without where the source is or its files' times: the plan less `source`, and per example its
    name under the source (a built-in's id), label and caption. With the shards' bytes it says "the same source"."""
    h = hashlib.sha256(json.dumps({k: v for k, v in plan.items() if k != "source"}, sort_keys=True).encode())
    for split in sorted(items):
        it = items[split]
        h.update(split.encode()), h.update(json.dumps(it.names if it.names is not None else it.ids).encode())
        h.update(json.dumps(it.labels).encode()), h.update(json.dumps(it.captions).encode())
    return h.hexdigest()


def shard_digest(it: Items, idx, shas: list) -> str | None:
    """shard_bytes of a shard from its files' hashes as the encode read them (Items.load): None for a built-in set,
    or when a file could not be read (no record: the stamps' verdict stands)."""
    from data.folders import digest_line, lines_digest

    if it.paths is None or any(sha is None for sha in shas):
        return None
    return lines_digest(digest_line(it.names[j], sha) for j, sha in zip(idx, shas))


def shard_bytes(it: Items, idx) -> str | None:
    """data.folders.bytes_digest of a shard's source files, read again (same_content); None for a built-in set,
    whose examples have no files, or when a file cannot be read."""
    from data.folders import bytes_digest

    if it.paths is None:
        return None
    try:
        return bytes_digest([it.paths[j] for j in idx], [it.names[j] for j in idx])
    except OSError:   # a file gone or unreadable (the encode skipped it as undecodable): no record, old verdict
        return None


def same_content(state: dict, plan: dict, items: dict, jobs: list, shard_name) -> bool:
    """The state's source and this one differ only in where the files are or when they were written: the same
    names, labels, captions and settings (content_key), and every finished shard's files hold the bytes it recorded
    (all read again: minutes for ImageNet, against the hours of encoding it saves)."""
    if not state.get("content") or state["content"] != content_key(plan, items):
        return False
    finished = [(items[split], idx, state["shards"][shard_name(split, i, n)]) for split, i, n, idx in jobs
                if shard_name(split, i, n) in state.get("shards", {})]
    if not finished or any(not info.get("bytes") for _, _, info in finished):
        return False   # shards from before the bytes were recorded: the stamps' verdict stands
    print(f"{plan['source']}: the source's files moved or have other times than when encoded: comparing their bytes "
          f"with those of the {len(finished)} finished shards ...", flush=True)
    return all(shard_bytes(it, idx) == info["bytes"] for it, idx, info in finished)


def changed_settings(was: dict | None, plan: dict) -> list[str]:
    """The plan keys (not the class names, which come from the source's files) that differ from an earlier plan."""
    return [k for k in sorted(set(plan) | set(was)) if k != "class_names" and was.get(k) != plan.get(k)] if was else []


def refuse_other_plan(out_dir: Path, diff: list[str]) -> None:
    """out= already holds a set (or an interrupted encode) made from another source, VAE or settings, or a set this
    command did not make: replacing it silently deleted it before the new encode had even started."""
    what = f" ({', '.join(diff)} differ)" if diff else ""
    if (out_dir / META_FILE).exists():
        raise UserError(f"{out_dir} already holds a prepared data set made from something else{what}: pick another "
                        f"out=, or add force=true to replace it (the old set is kept until the new one is complete)")
    raise UserError(f"{out_dir} holds an interrupted encode with other settings{what}: rerun with its settings to "
                    f"resume it, or add force=true to start over")
