"""Bring-your-own images: recognise the input folder layout and list (file, label, caption) examples per split.

Accepted layouts (anything else is a one-line UserError naming what was found and these three):

1. ImageFolder: `<dir>/<class>/<image>` (one sub-folder per class; class ids follow the sorted folder names).
2. Flat folder + labels: images in `<dir>` and `labels.csv` (header `file,label`) or `labels.jsonl`
   (`{"file": ..., "label": ...}` per line); labels are integers or class names (sorted into ids).
3. Flat folder + captions: images in `<dir>` and `captions.jsonl` (`{"file": ..., "caption": ...}` per line);
   one class ("all"), the caption travels with each record.

Splits: if `<dir>` holds sub-folders named `train` and optionally one of `val`/`validation`/`test`, each is read as its
own layout (ImageNet's `train/` + `val/`; the held-out one becomes the `test` split); otherwise the whole folder is the
`train` split. More than one held-out folder (say `val/` and `test/`) is refused: which one to evaluate on is the
user's call, not a silent pick. Keys `file_name`/`image` and `text` are accepted for `file` and `caption` (Hugging
Face `metadata.jsonl` style). Integer labels are ASCII digits; any other label (even '²') makes all labels names.

`load_image` reads, converts (`open_image`: 16-bit, 32-bit and float images scaled to 8 bits, alpha composited over
white), resizes the shorter side and centre-crops (ADM's `center_crop_arr`); a file that cannot be decoded returns
None so the caller can skip and count it. Tables are read as utf-8-sig: Excel's "CSV UTF-8" starts with a BOM.
"""

import csv
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.records import check_str
from training.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLIT_DIRS = {"train": "train", "val": "test", "validation": "test", "test": "test"}
LABEL_FILES = ("labels.csv", "labels.jsonl")
CAPTION_FILES = ("captions.jsonl",)
ACCEPTED = ("accepted layouts: ImageFolder <dir>/<class>/<image>; flat <dir>/<image> + labels.csv (file,label) or "
            "labels.jsonl; flat <dir>/<image> + captions.jsonl ({\"file\", \"caption\"}); optionally inside "
            "<dir>/train and <dir>/val or <dir>/test")


@dataclass
class Split:
    files: list[Path]
    labels: list[int]
    captions: list[str] | None = None


@dataclass
class Source:
    layout: str                     # "imagefolder" | "labels" | "captions"
    class_names: list[str]
    splits: dict[str, Split] = field(default_factory=dict)


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def file_stamp(path, name: str) -> str:
    """`name:size:mtime_ns` of the file at `path` (a str or Path): how an encode (and stage 2's folder reuse check)
    tells an edited image from the one it read, without reading it."""
    st = os.stat(path)
    return f"{name}:{st.st_size}:{st.st_mtime_ns}"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def digest_line(name: str, sha256: str) -> bytes:
    """One file's part of bytes_digest: its name and the sha256 of its bytes."""
    return f"{name}:{sha256}\n".encode()


def file_digests(paths: list, names: list[str]):
    """digest_line of each file, in order, read a few threads at a time (hashlib lets go of the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        for lo in range(0, len(paths), 4096):   # map() submits all it is given at once: ImageNet's 1.28M futures
            yield from map(digest_line, names[lo:lo + 4096], pool.map(file_sha256, paths[lo:lo + 4096]))


def lines_digest(lines) -> str:
    """sha256 over digest lines: bytes_digest of the files they describe, from lines already made."""
    total = hashlib.sha256()
    for line in lines:
        total.update(line)
    return total.hexdigest()


def bytes_digest(paths: list, names: list[str]) -> str:
    """sha256 over each file's name and the sha256 of its bytes (file_digests): what a list of files is by content,
    for when their stamps (file_stamp) changed but the bytes may not have (`cp -r` or `touch`, a copy on another
    disk). Reads every byte; only when the cheap stamps disagree (a preparation hashes the bytes it decodes)."""
    return lines_digest(file_digests(paths, names))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _describe(d: Path) -> str:
    files = [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
    imgs = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    others = sorted(p.name for p in files if p.suffix.lower() not in IMAGE_EXTS)
    subs = _subdirs(d)
    parts = [f"{len(imgs)} image files", f"{len(subs)} sub-folders"]
    if others:
        parts.append("other files " + ", ".join(others[:4]) + (" ..." if len(others) > 4 else ""))
    return ", ".join(parts)


def _read_table(path: Path) -> list[dict]:
    """Rows of labels.csv / *.jsonl as dicts; a malformed line is a UserError naming file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")   # drops the BOM of Excel's "CSV UTF-8" (else '\ufefffile')
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__})") from None
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and not {"file", "label"} <= set(rows[0]) and not {"file_name", "label"} <= set(rows[0]):
            raise UserError(f"{path} needs a header line with the columns file,label; found {list(rows[0])}")
        return rows
    rows = []
    for i, line in enumerate(text.split("\n"), 1):   # not splitlines(): U+2028 may sit inside a caption
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {i} is not a JSON object")
        rows.append(row)
    return rows


def _get(row: dict, keys: tuple, path: Path, what: str):
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return row[k]
    raise UserError(f"{path}: a row has no {what} (expected one of the keys {', '.join(keys)}): {str(row)[:120]}")


def _flat(d: Path, table: Path, kind: str) -> tuple[list[Path], list, list | None]:
    rows = _read_table(table)
    if not rows:
        raise UserError(f"{table} lists no images: add one line per image")
    files, values = [], []
    for row in rows:
        rel = str(_get(row, ("file", "file_name", "image"), table, "file name"))
        f = d / rel
        if not f.is_file():
            raise UserError(f"{table} names {rel}, which is not a file in {d}")
        files.append(f)
        values.append(_get(row, ("caption", "text"), table, "caption") if kind == "captions"
                      else _get(row, ("label",), table, "label"))
        if kind == "captions":   # named now, not by the text encoder hours into the encode
            check_str(str(values[-1]), f"{table}: the caption of {rel}")
    return files, values


def _scan(d: Path) -> tuple[str, list[Path], list, list | None]:
    """(layout, files, raw labels or class names, captions) of one split folder."""
    if not any(True for p in d.iterdir() if not p.name.startswith(".")):
        raise UserError(f"source folder {d} is empty: put images in it ({ACCEPTED})")
    imgs, subs = _images(d), _subdirs(d)
    caps = [d / n for n in CAPTION_FILES if (d / n).is_file()]
    labs = [d / n for n in LABEL_FILES if (d / n).is_file()]
    # captions.jsonl and labels.csv / .jsonl name their files relative to the folder, sub-folders included
    # ("images/0001.png", as stage 2's data=folder reads it): a table says what the folder is even when no image sits
    # directly inside (a labels table over images/ was read as an ImageFolder with one class, "images").
    if caps:
        files, captions = _flat(d, caps[0], "captions")
        return "captions", files, None, [str(c) for c in captions]
    if labs:
        files, labels = _flat(d, labs[0], "labels")
        return "labels", files, labels, None
    if subs and not imgs:
        files, names = [], []
        for s in subs:
            for f in _images(s):
                files.append(f)
                names.append(s.name)
        if not files:
            raise UserError(f"source folder {d} has sub-folders ({', '.join(s.name for s in subs[:5])}) but no "
                            f"images inside them; {ACCEPTED}")
        # An empty class folder would silently vanish and shift the ids of the classes after it, so that they no
        # longer match the sorted folder names (nor another split that has images for it): refuse it instead.
        empty = [s.name for s in subs if not _images(s)]
        if empty:
            raise UserError(f"class folders of {d} hold no image files directly inside: "
                            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} (add images or remove them)")
        return "imagefolder", files, names, None
    raise UserError(f"source folder {d} has a layout this project does not read: found {_describe(d)}; {ACCEPTED}")


def _is_int_label(v) -> bool:
    # ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() then rejects (or reads as another number).
    if isinstance(v, int):
        return not isinstance(v, bool)   # JSON true/false are names, not class ids
    return isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v.strip()) is not None


def scan_source(source) -> Source:
    """Recognise the layout of `source` and list its examples (sorted, so the order is reproducible)."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise UserError(f"source {root} is not a folder ({ACCEPTED})")
    subs = {s.name.lower(): s for s in _subdirs(root)}
    if "train" in subs and not _images(root):
        held_out = [subs[n] for n in SPLIT_DIRS if n in subs and SPLIT_DIRS[n] == "test"]
        if len(held_out) > 1:
            raise UserError(f"{root} has several held-out folders ({', '.join(p.name for p in held_out)}): keep one "
                            "of them (it becomes the test split) and move the others out")
        dirs = {SPLIT_DIRS[n]: subs[n] for n in SPLIT_DIRS if n in subs}
    else:
        dirs = {"train": root}
    scanned = {split: _scan(d) for split, d in dirs.items()}
    layouts = {v[0] for v in scanned.values()}
    if len(layouts) > 1:
        raise UserError(f"the split folders of {root} use different layouts ({', '.join(sorted(layouts))}): use one")
    layout = layouts.pop()
    if layout == "captions":
        class_names = ["all"]
        splits = {s: Split(f, [0] * len(f), c) for s, (_, f, _, c) in scanned.items()}
    else:
        raw = [v for (_, _, labels, _) in scanned.values() for v in labels]
        if layout == "labels" and all(_is_int_label(v) for v in raw):
            ids = {s: [int(v) for v in labels] for s, (_, _, labels, _) in scanned.items()}
            k = max(max(v) for v in ids.values()) + 1
            if min(min(v) for v in ids.values()) < 0:
                raise UserError(f"integer labels in {root} must be >= 0")
            used = len({v for labels in ids.values() for v in labels})
            if k > 1000 and k > 10 * used:   # an id, a date or a hash as label: k classes, most of them empty
                raise UserError(f"integer labels in {root} run up to {k - 1} but only {used} distinct values occur: "
                                f"class ids must be 0..K-1; renumber them, or use names (any non-integer text)")
            class_names = [str(i) for i in range(k)]
        else:
            class_names = sorted({str(v) for v in raw})
            index = {n: i for i, n in enumerate(class_names)}
            ids = {s: [index[str(v)] for v in labels] for s, (_, _, labels, _) in scanned.items()}
        splits = {s: Split(f, ids[s]) for s, (_, f, _, _) in scanned.items()}
    return Source(layout, class_names, splits)


def _scale_to_8bit(im):
    """A 16-bit, 32-bit integer or float grayscale image as mode L (LA when it has a transparent grey value), others
    unchanged. PIL's convert("L"/"RGB") clips these modes to 0..255 instead of scaling, so a 16-bit PNG (opened as
    I;16, or I) came out nearly white."""
    from PIL import Image

    if not (im.mode.startswith("I;16") or im.mode in ("I", "F")):
        return im
    raw = np.asarray(im)
    a = raw.astype(np.float64)
    if im.mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        a = a * 255 if a.size and a.min() >= 0 and a.max() <= 1 else a   # [0, 1] floats; else already 0..255
    elif im.mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535):
        a = a / 257                                   # 16-bit (mode I is how PIL often opens a 16-bit PNG)
    else:
        lo, hi = a.min(), a.max()                     # wider 32-bit values: their own range, not a silent clip
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    out = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    t = im.info.get("transparency")
    if isinstance(t, (int, float)) and not isinstance(t, bool):   # tRNS grey value, in the raw (16-bit) scale
        out.putalpha(Image.fromarray(np.where(raw == t, 0, 255).astype(np.uint8), "L"))
    return out


def open_image(path, channels: int, data: bytes | None = None):
    """The decoded image at `path` (or its bytes, `data`, read by the caller: they are hashed as well) as a PIL image
    in mode L (channels 1) or RGB, turned upright by its EXIF orientation; 16-bit, 32-bit and float images scaled to
    8 bits (_scale_to_8bit), transparency composited over white. Decoding errors propagate (OSError, ValueError,
    SyntaxError, DecompressionBombError): load_image skips the file, stage 2's read_folder refuses it."""
    import io

    from PIL import Image, ImageOps

    with Image.open(path if data is None else io.BytesIO(data)) as im:
        im.load()
        try:
            im = ImageOps.exif_transpose(im)   # a phone photo's EXIF orientation: stored upright, as viewers show it
        except Exception as e:   # noqa: BLE001 - a damaged EXIF block (Pillow: struct.error, TypeError, KeyError...)
            # The pixels decoded; only the orientation tag is unreadable. Use the image as stored rather than lose it.
            warnings.warn(f"{path}: its EXIF block is damaged ({type(e).__name__}); used as stored, not rotated",
                          stacklevel=2)
        im = _scale_to_8bit(im)
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        return im.convert("L" if channels == 1 else "RGB")


def load_hashed(path, resolution: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """(load_image of the file, the sha256 of the bytes it was decoded from), from one read: what a latent encode
    records of each shard's images (data.encode_plan.shard_digest). (None, None) when the file cannot be read."""
    try:
        data, sha = read_hashed(path)
    except OSError:
        return load_image(path, resolution, channels), None   # None, with the warning that says why
    return load_image(path, resolution, channels, data), sha


def read_hashed(path) -> tuple[bytes, str]:
    """A file's bytes and their sha256, from one read: what is hashed is what is then decoded."""
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()


def load_image(path: Path, resolution: int, channels: int, data: bytes | None = None) -> np.ndarray | None:
    """uint8 (resolution, resolution, channels): shorter side resized to `resolution` (bicubic; box-filtered first
    when shrinking a lot, as ADM does), centre-cropped. None (with a warning) if the file cannot be decoded. `data`:
    the file's bytes, when the caller read them."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = open_image(path, channels, data)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # DecompressionBombError (over twice PIL's pixel limit) is no OSError, but it is an unusable image all the same
        warnings.warn(f"skipping {path}: cannot decode it as an image ({type(e).__name__})", stacklevel=2)
        return None
    while min(im.size) >= 2 * resolution:   # ADM center_crop_arr: box-downsample by 2 first
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    s = resolution / min(im.size)
    im = im.resize(tuple(max(resolution, round(x * s)) for x in im.size), resample=Image.BICUBIC)
    a = np.asarray(im)
    top, left = (a.shape[0] - resolution) // 2, (a.shape[1] - resolution) // 2
    a = a[top:top + resolution, left:left + resolution]
    return a[..., None] if a.ndim == 2 else a
