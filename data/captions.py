"""Captioned data sets for stage 2, prepared once with their text features cached in the records.

Kinds (`data.kind`):
  emoji          Noto Color Emoji glyphs + CLDR names (data/emoji.py), at data.size (32 or 64)
  fashion_mnist  Fashion-MNIST with captions from the class names through a few templates
  folder         bring your own: data.folder of images + data.captions_file JSONL lines {"file": ..., "caption": ...}
  latents        bring your own, in a VAE's latent space: data.latents, a captioned folder encoded by `prepare_data.py
                 source=... vae=...` (its latents, labels and VAE are copied; its captions-<split>.jsonl get features)
Text features (data.text_encoder: minilm | t5gemma) are computed here, once: token states up to data.max_tokens
(stored float16) + mask + the caption string in every record, and meta["text"] = {encoder, dim, max_tokens}.
"""

import json
from pathlib import Path

import numpy as np

from data.meta import META_FILE, load_meta
from data.records import check_str
from data.text_reuse import SetChanged, check_reuse, folder_of, limit_of, request
from training.errors import UserError

FASHION_TEMPLATES = ("a photo of a {}", "a {}", "a black and white picture of a {}", "a small grayscale {}",
                     "{}, centred on a black background")
FASHION_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")


def fashion_captions(labels: np.ndarray, seed: int = 0) -> list[str]:
    """One caption per image: a template chosen by a seeded RNG, filled with the class name."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(FASHION_TEMPLATES), len(labels))
    return [FASHION_TEMPLATES[p].format(FASHION_NAMES[int(y)]) for p, y in zip(picks, labels)]


def caption_rows(folder: Path, captions_file: Path, limit: int | None) -> list[tuple[int, str, str]]:
    """(line number, file, caption) of each image the JSONL lists (data.limit: the first `limit`), every line checked
    before any image is read, so a typo on line 900,000 is reported at once."""
    if not captions_file.is_file():
        raise UserError(f"captions file {captions_file} not found: give data.captions_file=<JSONL of "
                        '{"file": ..., "caption": ...}>')
    try:   # utf-8-sig: Notepad and Excel start UTF-8 files with a byte-order mark
        text = captions_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{captions_file} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):   # not splitlines(): U+2028 and friends may sit inside a caption
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = json.loads(line)
            file, cap = row["file"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{captions_file} line {n} is not a JSON object with 'file' and 'caption'") from None
        if not isinstance(file, str) or not file.strip():
            raise UserError(f"{captions_file} line {n}: file must be a path relative to {folder}, got {file!r}")
        if not isinstance(cap, str) or not cap.strip():
            raise UserError(f"{captions_file} line {n}: caption must be a non-empty string")
        check_str(cap, f"{captions_file} line {n}: the caption")
        rows.append((n, file, cap))
    if not rows:
        raise UserError(f"{captions_file} lists no images")
    return rows


def _folder_image(folder: Path, captions_file: Path, row: tuple[int, str, str], size: int) -> tuple[np.ndarray, str]:
    """One listed image as RGB uint8 (size, size, 3), centre-cropped square and resized, and the sha256 of the bytes
    it was decoded from (the file is read once: data.text_shards records what each shard was made from). Decoded by
    stage 1's data.folders.open_image, so both stages read a file alike (16-bit scaled, alpha over white); the crop
    and LANCZOS resize stay this function's own, so sets prepared before keep their pixels."""
    from PIL import Image

    from data.folders import open_image, read_hashed

    n, file, _ = row
    try:
        data, sha = read_hashed(folder / file)
        im = open_image(folder / file, 3, data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:   # the bomb guard is no OSError
        raise UserError(f"{captions_file} line {n}: cannot read image {folder / file} ({e})") from None
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)), sha


def read_folder(folder, captions_file, size: int, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Bring-your-own, in memory: JSONL {file, caption} -> RGB uint8 (N, size, size, 3) and the captions. Preparing
    a set streams instead (_prepare_folder_text); this reads the same pixels."""
    folder, captions_file = Path(folder), Path(captions_file)
    rows = caption_rows(folder, captions_file, limit)
    return np.stack([_folder_image(folder, captions_file, r, size)[0] for r in rows]), [r[2] for r in rows]


def _load(dc) -> dict:
    """The small built-in captioned sets, in memory: {"train": (x, y, captions), maybe "test": ..., "class_names",
    "source"}. Folders and latents, of any size, are written a batch at a time instead (data/text_shards.py)."""
    kind = str(dc.kind)
    if kind == "emoji":
        from data.emoji import load_emoji

        d = load_emoji(int(dc.size), limit=dc.get("limit"))
        y = np.arange(len(d["x"]), dtype=np.int64)   # every emoji is its own class (index into class_names)
        return {"train": (d["x"], y, d["captions"]), "class_names": d["captions"], "source": d["source"]}
    if kind == "fashion_mnist":
        from data.builtin import load_builtin

        if int(dc.size) != 28:   # the images are Fashion-MNIST's own; a stage-1 run to start from shares the size
            raise UserError(f"data.size={dc.size}: Fashion-MNIST's images are 28x28 and are not resized; leave "
                            "data.size at 28")
        d = load_builtin("fashion_mnist")
        out = {"class_names": d["class_names"], "source": d["source"] + " + template captions"}
        for i, split in enumerate(("train", "test")):
            x, y = d[split]
            if dc.get("limit"):
                x, y = x[:int(dc.limit)], y[:int(dc.limit)]
            out[split] = (x, y, fashion_captions(y, seed=i))
        return out
    raise UserError(f"unknown captioned data kind {kind!r}: emoji | fashion_mnist | folder | latents")


def _latent_source(dc) -> tuple[Path, dict]:
    """(dir, meta) of data.latents: VAE latents of a captioned folder, as `prepare_data.py source=... vae=...` wrote
    them (captions-<split>.jsonl beside the shards, one line per record)."""
    from data.vae import is_latent

    src = Path(str(dc.latents)).expanduser()
    encode = lambda out: (f"`python prepare_data.py source=<folder with captions.jsonl> vae=<VAE> "
                          f"resolution=<size> out={out}`")
    if not (src / META_FILE).is_file():
        raise UserError(f"data.latents={dc.latents} holds no prepared latents: encode a captioned folder first, "
                        f"{encode(dc.latents)}")
    meta = load_meta(src)
    if not is_latent(meta) or not (src / "captions-train.jsonl").is_file():
        what = "latents without captions" if is_latent(meta) else "pixels, not VAE latents"
        raise UserError(f"data.latents={dc.latents} holds {what}: stage 2 on latents needs a captioned folder encoded "
                        f"by {encode('<new dir>')}" + ("" if is_latent(meta) else "; for pixels use data=folder"))
    return src, meta


def _captions_of(f: Path) -> list[str]:
    """The captions of an encoded split, one per record in record order (data/encode.py writes them)."""
    try:
        return [json.loads(line)["caption"] for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{f} is damaged (not JSON lines with a 'caption'): encode the folder again (the "
                        f"prepare_data.py command that made it, with force=true)") from None


def _prepare_folder_text(dc, out_dir: Path, enc, text_meta: dict, rows: list) -> None:
    """kind `folder`, streamed: `rows` (caption_rows, every line already checked) are decoded a few threads at a time
    (PIL lets go of the GIL) and written with their captions' features a batch at a time; the channel statistics are
    merged across batches."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from data import text_shards
    from data.folders import digest_line, file_digests
    from data.meta import combine_stats, write_meta
    from data.prepare import RECORDS_PER_SHARD, set_meta

    folder, captions_file, size = folder_of(dc), Path(str(dc.captions_file)), int(dc.size)
    per_shard = min(RECORDS_PER_SHARD, max(1, text_shards.SHARD_BYTES // (size * size * 3)))
    state = text_shards.start(out_dir, text_shards.resume_request(text_meta, per_shard, enc))
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        def chunk(idx):
            got = list(pool.map(lambda j: _folder_image(folder, captions_file, rows[j], size), idx))
            return (np.stack([x for x, _ in got]), np.zeros(len(idx), np.int64), [rows[j][2] for j in idx],
                    [digest_line(rows[j][1], sha) for j, (_, sha) in zip(idx, got)])

        def file_lines(idx):   # a finished shard's images, read again (not decoded) at a resume
            return list(file_digests([folder / rows[j][1] for j in idx], [rows[j][1] for j in idx]))

        files, stats, digest = text_shards.write_split(out_dir, state, "train", len(rows), per_shard, chunk, enc,
                                                       int(dc.max_tokens), file_lines=file_lines)
    # the images' bytes as decoded: a copy with new times is then known for the same set (data.text_reuse)
    text_meta = {**text_meta, "request": {**text_meta["request"], "images_bytes_sha256": digest}}
    meta = set_meta(str(dc.name), f"folder {dc.folder} with captions {dc.captions_file}", (size, size, 3), "uint8",
                    ["image"], {"train": {"files": files, "num_records": len(rows)}}, *combine_stats(stats))
    write_meta(out_dir, {**meta, "text": text_meta})
    text_shards.finish(out_dir)


def _prepare_latents_text(dc, out_dir: Path, enc, text_meta: dict, src: Path, meta: dict) -> None:
    """kind `latents`, streamed: each output shard holds the next RECORDS_PER_SHARD source records (same order) with
    their captions' features. The latents are copied as stored, and the source's VAE entry and channel statistics
    (its normalisation) are taken over, not recomputed."""
    from data import text_shards
    from data.loader import read_records
    from data.meta import META_FORMAT_VERSION, write_meta
    from data.prepare import RECORDS_PER_SHARD

    state = text_shards.start(out_dir, text_shards.resume_request(text_meta, RECORDS_PER_SHARD, enc))
    splits = {}
    for split in meta["splits"]:
        f = src / f"captions-{split}.jsonl"
        if not f.is_file():
            continue
        caps = _captions_of(f)
        n, records = read_records(meta, src, split)
        if len(caps) != n:
            raise UserError(f"{f} lists {len(caps)} captions for {n} records of {src}: encode it again (the "
                            f"prepare_data.py command that made it, with force=true)")
        n = n if limit_of(dc) is None else min(n, limit_of(dc))
        at = {"next": 0, "records": records}   # a sequential reader, started again past the shards a resume keeps

        def chunk(idx, split=split, at=at):
            if at["next"] != int(idx[0]):
                at["records"] = read_records(meta, src, split, start=int(idx[0]))[1]
            recs = [next(at["records"]) for _ in idx]
            at["next"] = int(idx[-1]) + 1
            return (np.stack([r["x"] for r in recs]), np.array([r["label"] for r in recs], np.int64),
                    [caps[j] for j in idx], None)

        files, _, _ = text_shards.write_split(out_dir, state, split, n, RECORDS_PER_SHARD, chunk, enc,
                                              int(dc.max_tokens))
        splits[split] = {"files": files, "num_records": int(n)}
    keep = ("encoder", "shape", "dtype", "num_classes", "class_names", "channel_mean", "channel_std", "shift", "scale")
    write_meta(out_dir, {"format_version": META_FORMAT_VERSION, "name": str(dc.name),
                         "source": f"latents {src.resolve()} of {meta['source']}", "splits": splits,
                         **{k: meta[k] for k in keep}, "text": text_meta})
    text_shards.finish(out_dir)


def ensure_prepared_text(dc, encoder=None, held=None) -> tuple[dict, Path]:
    """(meta, dir) of the captioned set `<data.root>/<data.name>`, preparing it (and its text features) on first use;
    a copy prepared from another request (data.text_reuse.request) is refused. Prepared once under a lock, as the
    built-ins are (data.prepare.prepare_once); `held`: as in data.prepare.ensure_prepared."""
    from data.prepare import prepare_once
    from data.rebuild import prepared_for_reading

    out_dir = Path(dc.root) / dc.name
    if str(dc.kind) == "latents" and Path(str(dc.latents)).expanduser().resolve() == out_dir.resolve():
        raise UserError(f"data.root/data.name ({out_dir}) is data.latents itself: give the captioned copy another "
                        f"data.name (the latents stay as they are, for stage 1)")

    def ready():
        for _ in range(3):
            if not (out_dir / META_FILE).exists():
                return None
            meta = load_meta(out_dir)
            try:
                check_reuse(meta, dc, out_dir)
                return meta
            except SetChanged:   # another process recorded or rebuilt it while this one compared bytes: again
                continue
        raise UserError(f"{out_dir} kept changing while it was checked (other processes preparing it): run again")

    prepare = lambda: prepare_once(out_dir, ready, lambda: _prepare_text(dc, out_dir, encoder))   # noqa: E731
    return (prepare() if held is None else prepared_for_reading(out_dir, prepare, held)), out_dir


def _prepare_text(dc, out_dir: Path, encoder) -> None:
    import contextlib

    from data.rebuild import prepared_for_reading
    from data.text import get_encoder

    # sources are read (latents, folders: checked) before anything is said or the text encoder loads, so a wrong path
    # or an unset key (???) is one line at once
    kind = str(dc.kind)
    with contextlib.ExitStack() as held:   # the source latents are held for reading while they are copied
        latents = prepared_for_reading(Path(str(dc.latents)).expanduser(), lambda: _latent_source(dc), held) \
            if kind == "latents" else None
        rows = caption_rows(folder_of(dc), Path(str(dc.captions_file)), limit_of(dc)) \
            if kind == "folder" else None
        print(f"preparing captioned data set {dc.name!r} ({dc.kind}) in {out_dir} ...", flush=True)
        enc = encoder or get_encoder(str(dc.text_encoder), dc.get("text_encoder_path"))
        enc.reset_counts()
        try:
            _make_text_set(dc, out_dir, enc, latents, rows)
        finally:   # said also when the preparation stops: which captions the set holds cut
            note = enc.truncation_note("captions", int(dc.max_tokens))
            if note:
                print(note, flush=True)


def _make_text_set(dc, out_dir: Path, enc, latents, rows) -> None:
    from data.prepare import prepare_arrays

    d = None if latents or rows else _load(dc)
    text_meta = {"encoder": enc.name, "encoder_source": enc.source, "encoder_path": dc.get("text_encoder_path"),
                 "dim": enc.dim, "max_tokens": int(dc.max_tokens), "stored_dtype": "float16",
                 "request": request(dc, rows)}   # the rows parsed already: the captions file is not parsed again
    if latents:   # streamed shard by shard
        return _prepare_latents_text(dc, out_dir, enc, text_meta, *latents)
    if rows:   # streamed shard by shard, recording the images' bytes as they are decoded
        return _prepare_folder_text(dc, out_dir, enc, text_meta, rows)
    splits, text = {}, {}
    for split in ("train", "test"):
        if split in d:
            x, y, caps = d[split]
            splits[split] = (x, y)
            text[split] = _features_f16(enc, caps, int(dc.max_tokens))
    prepare_arrays(out_dir, str(dc.name), splits, d["class_names"], d["source"], text=text, text_meta=text_meta)


def _features_f16(enc, caps: list[str], max_tokens: int) -> dict:
    """Caption features of a whole split as stored (float16), computed FEATURE_BATCH captions at a time: the float32
    states of every caption at once were twice the stored size again (Fashion-MNIST's 60k x 16 x 384 with MiniLM:
    1.5 GB; with a 2304-wide T5Gemma, 8.8 GB). The same features: the encoder's own batches fall alike."""
    from data.text_shards import FEATURE_BATCH

    states = np.zeros((len(caps), max_tokens, enc.dim), np.float16)
    mask = np.zeros((len(caps), max_tokens), bool)
    for lo in range(0, len(caps), FEATURE_BATCH):
        s, m = enc.encode(caps[lo:lo + FEATURE_BATCH], max_tokens)
        states[lo:lo + len(m)], mask[lo:lo + len(m)] = s, m
    return {"text": states, "mask": mask, "caption": caps}
