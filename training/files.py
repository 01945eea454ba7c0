"""Files written whole or not at all: write to a temporary name beside the target, then rename over it.

A write cut short (disk full, Ctrl-C, kill -9) leaves the file the target held before, never half of a new one, and
rename is atomic within a folder on POSIX file systems. Every file a user keeps (meta.json, sample npz and PNG
grids, evaluation JSON, encoding progress) is written through `atomic_write`.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path` (same suffix, so writers that append one, like np.savez, keep it) to
    write to; on a clean exit it is flushed to disk, made readable by all (the umask still applies to the folder)
    and renamed over `path`; on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def stale_temps(path) -> list[Path]:
    """The temporary files atomic_write made for `path` and never renamed: a killed writer's (ask only while no
    writer of `path` runs: under its lock)."""
    import glob

    path = Path(path)
    return list(path.parent.glob(f".{glob.escape(path.stem)}.tmp-*{glob.escape(path.suffix)}"))


def write_json(path, obj, indent: int | None = 1) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def write_text(path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def weights_fingerprint(directory) -> str | None:
    """A cheap identity of the safetensors weights in a model directory: sha256 over each file's name, size and 16
    blocks of 64 KiB spread over it. Other weights (retrained, or another random init of the same config) differ in
    every block, and ~1 MiB is read per file however large the model. None when there are no such files."""
    import hashlib

    path = Path(str(directory)).expanduser()   # vae=~/vaes/x: is_dir on the unexpanded path said "no weights"
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()
