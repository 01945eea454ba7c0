"""One writer per checkpoint directory or sample.py out= (`RunLock`, refused at once); one preparer per data set,
latent encode or evaluation classifier (`exclusive`, waited for); no rebuild of a data set that runs are reading
(`shared` by the readers, `unshared` by the rebuild, refused at once).

Two runs writing into one `train.ckpt_dir` (a job submitted twice, a requeued job whose first copy still runs, a
command pasted into two terminals) would interleave their steps, delete each other's checkpoints through
keep-last-N, and the second one's start-up would remove the first one's save in progress as "left by a kill". The
run that writes (process 0) holds an exclusive `flock` on `<ckpt_dir>/.run.lock` for its whole life; the kernel drops
it when the process ends in any way (kill -9 included), so a lock is never stale. sample.py reads a run without it,
and holds `.<out>.lock` beside the npz it writes.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from training.errors import UserError

LOCK_FILE = ".run.lock"


def _flock(fd: int, wait: bool, shared: bool = False) -> bool:
    """Take an exclusive (or `shared`) flock on `fd`: False when another process holds a conflicting one and `wait`
    is false. A file system without flock (some Lustre mounts) counts as taken: the work then runs unguarded, as
    before these locks."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


class RunLock:
    """An exclusive flock on `<directory>/<name>` held by one writer, refused at once to another (one line naming
    the holder). `writing`: what is written, in that line (default: the directory). `with RunLock(...):` holds it
    for the block; acquire() / release() where the holder's life is not one block (a checkpoint manager)."""

    def __init__(self, directory, elsewhere: str = "choose another train.ckpt_dir", name: str = LOCK_FILE,
                 who: str = "another run", writing: str | None = None):
        self.path = Path(directory) / name
        self.elsewhere = elsewhere   # the refusal's way out
        self.who, self.writing = who, writing or str(Path(directory))
        self.fd = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, wait=False):
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise UserError(f"{self.who} ({holder}) is writing to {self.writing}: wait for it to end or stop "
                            f"it, or {self.elsewhere}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)     # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {int(h['pid'])} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "unknown process"


_HELD = threading.local()   # .paths: the locks `exclusive` holds in this thread


@contextlib.contextmanager
def exclusive(path, waiting: str):
    """Hold an exclusive flock on `path` (created if absent) for the block, waiting for another holder first (with
    `waiting` printed once). Preparing a data set on first use runs under it: two runs started together on a fresh
    machine each rewrote the set, deleting shards the other had just read meta.json for (development_log.md).
    Re-entrant within a thread (a `force=true` rebuild prepares inside its own lock): a second flock on another
    descriptor of the same file would wait for the first forever. Where the lock file can be neither made nor
    opened for want of access, the block runs unguarded (_lock_fd); a folder that cannot be made raises."""
    path = Path(path)
    key = str(path.absolute())
    held = _HELD.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flocked(path, False, waiting):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


@contextlib.contextmanager
def _flocked(path: Path, share: bool, busy):
    """The one way a lock is held: a flock on `path` for the block, none where _lock_fd gives no descriptor (a
    read-only place, where no one else writes either). While another process holds a conflicting one, `busy` (a
    string) is printed once and waited out, or (a UserError) raised at once. Closing the descriptor drops it."""
    fd = _lock_fd(path)
    try:
        if fd is not None and not _flock(fd, wait=False, shared=share):
            if isinstance(busy, UserError):
                raise busy
            print(busy, flush=True)
            _flock(fd, wait=True, shared=share)
        yield
    finally:
        if fd is not None:
            os.close(fd)


_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)   # ENOENT: a file system that makes no files


def _lock_fd(path: Path) -> int | None:
    """A descriptor of the lock file `path` (created if absent), or None where it can be neither created nor opened
    for want of access: a read-only copy of a data set, which no one can rebuild in place either, is read unguarded.
    Other errors (a full disk, too many open files) are raised, as before. Another user's lock file is opened
    read-only (flock needs no write access; on NFS, where flock is emulated by POSIX locks, an exclusive lock on it
    fails and the work runs unguarded, as it did before it was honoured)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in _NO_ACCESS:
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno not in _NO_ACCESS:
            raise
        return None


@contextlib.contextmanager
def shared(path, waiting: str):
    """Hold a shared flock on `path` for the block, beside any number of other holders; an `unshared` holder is
    waited for first (with `waiting` printed once). Nothing is created where `path`'s folder does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        yield
        return
    with _flocked(path, True, waiting):
        yield


@contextlib.contextmanager
def unshared(path, refusal: str):
    """Hold an exclusive flock on `path` for the block; UserError(refusal) at once while a `shared` holder is there.
    Holders that come meanwhile wait for the block to end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flocked(path, False, UserError(refusal)):
        yield
