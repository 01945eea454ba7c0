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


def write_json(path, obj, indent: int | None = 1) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))
