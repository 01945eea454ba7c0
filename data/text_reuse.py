"""What a captioned set (data/captions.py) was made from, and whether a request may reuse it.

meta["text"]["request"] records the request (kind, sizes, text encoder and its weights, and what the sources are:
hashes of the captions, of the latents' meta, and of the images' stamps and bytes). At every start of stage 2 the
request of the config is compared with it: another source or encoder is refused (one line), a source that moved or
is gone leaves the prepared copy in use, since training reads only the prepared records.
"""

import hashlib
import os
from pathlib import Path

from data.meta import META_FILE, load_meta, write_meta
from training.errors import UserError


def latents_sha256(src: Path) -> str | None:
    """What a latent source is, by content: its meta.json (VAE and its weights' hash, shapes, counts, statistics) and
    its captions. None when it is gone."""
    if not (src / META_FILE).is_file():
        return None
    h = hashlib.sha256((src / META_FILE).read_bytes())
    for f in sorted(src.glob("captions-*.jsonl")):
        h.update(f.name.encode()), h.update(f.read_bytes())
    return h.hexdigest()


def _rows(folder: Path, captions_file: Path, limit):
    """The listed images' rows (data.captions.caption_rows), or None when the folder or the captions are gone."""
    from data.captions import caption_rows

    if not (folder.is_dir() and captions_file.is_file()):
        return None
    try:
        return caption_rows(folder, captions_file, limit)
    except UserError:
        return None


def images_sha256(folder: Path, rows) -> str | None:
    """What the listed images (`rows`: _rows) are, cheaply: each one's path, size and modification time (as a latent
    encode tells an edited image, data/encode.py). None when the folder, the captions or an image is gone (a
    prepared copy elsewhere)."""
    from data.folders import file_stamp

    if rows is None:
        return None
    base = str(folder)   # run at every start and resume: str paths, as pathlib's joins cost as much as the stat calls
    try:
        stamps = [file_stamp(os.path.join(base, file), file) for _, file, _ in rows]
    except OSError:
        return None
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def images_bytes_sha256(folder: Path, rows) -> str | None:
    """What the listed images are by content (data.folders.bytes_digest: every byte read), recorded when the set is
    prepared and compared only when the stamps (images_sha256) disagree. None when something listed is gone."""
    from data.folders import bytes_digest

    if rows is None:
        return None
    try:
        return bytes_digest([os.path.join(str(folder), file) for _, file, _ in rows], [file for _, file, _ in rows])
    except OSError:
        return None


def request(dc, rows=None) -> dict:
    """What a captioned set is made from. Stored in meta["text"]["request"] so that `data.name` pointing at a copy
    prepared from another folder, captions file, size, limit or encoder is refused instead of silently reused (the
    folder config keeps one name, `my_captions`, for every folder). `rows`: the captions file's rows when the caller
    has parsed them already (the file is parsed otherwise)."""
    return _request(dc, rows)[0]


def _request(dc, rows=None) -> tuple[dict, list | None]:
    """request(dc) and the caption rows it stamped the images of (None without them)."""
    from data.text import encoder_weights

    opt_path = lambda v: None if v is None else str(Path(str(v)).resolve())
    req = {"kind": str(dc.kind), "limit": limit_of(dc),
           "text_encoder": str(dc.text_encoder),
           "max_tokens": int(dc.max_tokens),   # not the encoder's path: weights that moved are the same encoder,
           "text_encoder_weights": encoder_weights(str(dc.text_encoder), dc.get("text_encoder_path"))}  # others not
    if req["kind"] == "latents":   # latents come at the size they were encoded at
        src = Path(str(dc.latents)).expanduser()
        req.update(latents=opt_path(src), latents_sha256=latents_sha256(src))
    else:
        req["size"] = int(dc.size)
    if req["kind"] == "folder":
        captions = Path(str(dc.captions_file))
        rows = rows if rows is not None else _rows(folder_of(dc), captions, req["limit"])
        req.update(folder=opt_path(dc.folder), captions_file=opt_path(captions),
                   captions_sha256=hashlib.sha256(captions.read_bytes()).hexdigest() if captions.is_file() else None,
                   images_sha256=images_sha256(folder_of(dc), rows))
    return req, rows


def check_reuse(meta: dict, dc, out_dir: Path) -> None:
    """Refuse a prepared captioned set that was made from another request. Sets prepared before the request was
    recorded, or by other code (prepare_arrays with text directly), are taken as they are: training reads the token
    count and encoder from their meta, not from the config."""
    if not meta.get("text"):
        if (out_dir / "captions-train.jsonl").is_file():   # encoded latents of a captioned folder, not yet featurised
            raise UserError(f"{out_dir} holds the latents of a captioned folder: train stage 2 on them with "
                            f"data=latents_text data.latents={out_dir}")
        raise UserError(f"{out_dir} holds a data set without captions: pick another data.name for stage 2")
    was = meta["text"].get("request")
    if was is None:
        return
    now, rows = _request(dc)
    if now["kind"] == "folder" and was.get("captions_sha256"):
        # Sources that moved (prepared/ copied to another machine, a folder renamed) or are gone leave the prepared
        # set usable: the captions' hash, not their path, says whether they changed; another folder of images counts
        # as moved only when the one recorded is no longer there, or when its images have the recorded bytes.
        if now["captions_sha256"] is None:
            print(f"note: {dc.captions_file} is gone; using {out_dir}, prepared from {was.get('captions_file')}",
                  flush=True)
        if now["captions_sha256"] in (None, was["captions_sha256"]):
            now.update(captions_file=was.get("captions_file"), captions_sha256=was["captions_sha256"])
            if now["captions_sha256"] is None or not Path(str(was.get("folder"))).is_dir():
                now["folder"] = was.get("folder")
            if now["images_sha256"] is not None and (now["folder"], now["images_sha256"]) != (was.get("folder"),
                                                                                          was.get("images_sha256")):
                _same_bytes(meta, dc, out_dir, now, rows)
        if now["images_sha256"] is None:   # images gone (a copy elsewhere): the prepared pixels are all there is
            now["images_sha256"] = was.get("images_sha256")
    if now["kind"] == "latents" and was.get("latents_sha256"):
        # The same for latents: moved or gone, the copy here is still theirs; re-encoded or re-captioned, it is not.
        if now["latents_sha256"] is None:
            print(f"note: {dc.latents} is gone; using {out_dir}, prepared from {was.get('latents')}", flush=True)
        if now["latents_sha256"] in (None, was["latents_sha256"]):
            now.update(latents=was.get("latents"), latents_sha256=was["latents_sha256"])
    # a key recorded only by later code (text_encoder_weights) is not held against a set prepared before it
    diff = [f"{k}: prepared {was.get(k)!r}, asked {now[k]!r}" for k in now if k in was and was[k] != now[k]]
    if diff:
        raise UserError(f"{out_dir} was prepared from something else ({'; '.join(diff)}): pick a new data.name, or "
                        f"rebuild it (`python prepare_data.py data=<this config> <your overrides> force=true`)")


class SetChanged(Exception):
    """meta.json changed while the images' bytes were compared (another process recorded or rebuilt the set):
    data.captions.ensure_prepared_text reads it again and judges against what is there now."""


def _same_bytes(meta: dict, dc, out_dir: Path, now: dict, rows) -> None:
    """The listed images' stamps (or their folder) are not those recorded, under the same captions: a `cp -r` to
    scratch disk, a `touch`, or edited images. Their bytes say which. The same bytes are the same set: `now` takes
    the recorded values, and meta.json records the images where they are now (under the set's lock), keeping the
    last few (folder, stamps) already compared (`images_verified`: hosts with scratch copies of their own then each
    compare once, not at every start). Sets prepared before the bytes were recorded keep the stamps' verdict."""
    from data.rebuild import preparing_lock
    from training.runlock import exclusive

    was = meta["text"]["request"]
    if not was.get("images_bytes_sha256"):
        return
    here = [now["folder"], now["images_sha256"]]
    if here not in was.get("images_verified", []):
        folder = folder_of(dc)
        print(f"note: the images in {folder} are not as {out_dir} recorded them (other times, or another folder): "
              f"comparing their bytes with the prepared ones ...", flush=True)
        if images_bytes_sha256(folder, rows) != was["images_bytes_sha256"]:
            return   # refused by the caller: the stamps differ, and so do the bytes
        with exclusive(preparing_lock(out_dir), f"waiting for another process preparing {out_dir} ..."):
            try:
                current = load_meta(out_dir)
            except UserError:
                current = None
            if current != meta:   # rebuilt, recorded or removed meanwhile: judged again against what is there
                raise SetChanged
            seen = [v for v in was.get("images_verified", []) if v != here] + [[was.get("folder"),
                                                                                 was.get("images_sha256")]]
            recorded = dict(was, folder=here[0], images_sha256=here[1], images_verified=seen[-VERIFIED:])
            meta["text"] = {**meta["text"], "request": recorded}
            write_meta(out_dir, meta)
        print(f"note: same bytes: {out_dir} is used as prepared", flush=True)
    now.update(folder=was.get("folder"), images_sha256=was.get("images_sha256"))


VERIFIED = 8   # (folder, stamps) pairs kept as compared


def limit_of(dc) -> int | None:
    return None if dc.get("limit") is None else int(dc.limit)


def folder_of(dc) -> Path:
    return Path(str(dc.folder)).expanduser()


# Where a captioned set's sources are and their stamps, in its request: not what they hold (the hashes are). Left
# out of a preparation's resume key (data.text_shards.resume_request), so it resumes on a copy of its sources.
PATH_KEYS = ("folder", "captions_file", "images_sha256", "latents")
