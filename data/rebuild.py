"""Rebuilding a complete data set (`prepare_data.py ... force=true`) without losing it: the old copy is set aside
until the new one is complete, a killed rebuild resumes or is undone, and all of it runs under the set's preparing
lock, so that two preparations never write one set at once. Runs hold the set they read (`reading`): a rebuild is
refused while they do, instead of renaming the set away under them.
"""

import os
from pathlib import Path

from data.meta import META_FILE
from training.errors import UserError
from training.runlock import exclusive, shared, unshared


def preparing_lock(out_dir: Path) -> Path:
    """The lock file for preparing `out_dir`: beside it, since a rebuild may replace the folder itself."""
    return out_dir.parent / f".{out_dir.name}.prepare.lock"


def readers_lock(out_dir) -> Path:
    """The lock file that runs reading `out_dir` share: beside the folder where it lives (a symlinked set is rebuilt
    there, whichever path names it)."""
    target = Path(out_dir).resolve()
    return target.parent / f".{target.name}.readers.lock"


def reading(out_dir):
    """Held (a shared lock) by each run for as long as it reads the set: training with its grids and evaluation,
    sample.py and text_eval to their end; a latent set's pixel set and the autoencoder's scoring set while their
    evaluator reads them. A rebuild of the set (force=true, or an encode whose source changed, or a built-in copy
    re-cut to today's split) is refused meanwhile. It renamed the set away under them: a run that reached its
    evaluation (the test split, the cached classifier) during an hours-long encode failed there, or scored the new
    set's images; a rebuild in progress is waited for here instead."""
    return shared(readers_lock(out_dir), f"waiting for another process rebuilding {out_dir} ...")


def prepared_for_reading(out_dir, prepare, held):
    """prepare() (the set's meta, made if absent) with the set held for reading (`reading`, entered into the
    ExitStack `held`). The lock is taken once the set is complete; if meta.json changed meanwhile (made, mended or
    rebuilt by this or another process), prepare() reads the set again, now that no rebuild can replace it."""
    before = meta_stamp(out_dir)
    result = prepare()
    held.enter_context(reading(out_dir))
    if before is None or meta_stamp(out_dir) != before:
        result = prepare()
    return result


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
    with exclusive(preparing_lock(out_dir), f"waiting for another process preparing {out_dir} ..."), \
            unshared(readers_lock(out_dir), _being_read(out_dir)):
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


def _being_read(out_dir) -> str:
    return (f"{out_dir} is being read by a run (training, sample.py, an evaluation): let it end or stop it, then run "
            "this command again, or prepare the new set elsewhere (another out= or data.root)")


def refuse_if_read(out_dir) -> None:
    """rebuild_keeping_old's refusal before the slow part of a command that will rebuild (loading a VAE, comparing a
    source): a set being read is said at once, not after a minute. The rebuild itself checks again."""
    with unshared(readers_lock(out_dir), _being_read(out_dir)):
        pass


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
    """(meta.json's inode, size and mtime; each shard's name, inode and mtime), None without meta.json: taken when a
    force=true command starts, compared once it holds the set's lock (done_meanwhile), and around taking a set for
    reading (prepared_for_reading). No clock is compared: a file server's may differ from this host's."""
    out_dir = Path(out_dir)
    try:
        st = (out_dir / META_FILE).stat()
        shards = tuple(sorted((p.name, *_ino_mtime(p)) for p in out_dir.glob("*.array_record")))
    except OSError:   # removed while listed: the set is changing
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns), shards


def _ino_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def done_meanwhile(out_dir, before, prepare):
    """A force=true (the same job submitted twice) that waited for another process, which completed the set
    meanwhile (meta.json appeared, or the shards changed since `before`; a check that records where a captioned
    set's images are now rewrites meta.json alone, and is no rebuild): that set, if preparing without force accepts
    it as this command's (`prepare()`), instead of rebuilding it again, without its meta.json meanwhile; else None."""
    now = meta_stamp(out_dir)
    if now is None or (before is not None and now[1] == before[1]):
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
