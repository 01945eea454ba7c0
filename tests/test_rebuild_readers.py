"""A data set that runs are reading is not rebuilt under them (data.rebuild.reading / unshared)."""

import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from training import cli


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_a_set_a_run_reads_is_not_rebuilt_under_it(digits_root, tmp_path, monkeypatch, capsys):
    """`prepare_data.py data=digits force=true` while a run trains on digits renamed the set away under it: the run's
    evaluation then failed on a set half-rebuilt (hours, for a latent encode) or scored the new set. Now the rebuild
    is refused in one line while the run holds the set, and goes ahead once it has ended."""
    import prepare_data
    import train_stage1
    import training.loop

    root = tmp_path / "data"
    shutil.copytree(Path(digits_root) / "digits", root / "digits", ignore=shutil.ignore_patterns("classifier"))
    before = _files(root / "digits")
    rebuild = ["prepare_data.py", "data=digits", f"data.root={root}", "force=true"]
    seen = {}

    def run(cfg, task):   # in place of training: the rebuild another terminal starts meanwhile
        monkeypatch.setattr(sys, "argv", rebuild)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main("prepare", prepare_data.main)
        seen["code"], seen["err"] = exc.value.code, capsys.readouterr().err.strip().splitlines()
        seen["files"] = _files(Path(task.data_dir))
    monkeypatch.setattr(training.loop, "run", run)
    monkeypatch.setattr(sys, "argv", ["train_stage1.py", "data=digits", f"data.root={root}", "model=tiny"])
    cli.main("config", train_stage1.main)
    assert seen["code"] == 2 and len(seen["err"]) == 1, seen["err"]
    assert "is being read by a run" in seen["err"][0] and "run this command again" in seen["err"][0], seen["err"]
    assert seen["files"] == before and not list(root.glob(".digits.replaced-*"))   # untouched, nothing set aside
    monkeypatch.setattr(sys, "argv", rebuild)   # the run has ended: the rebuild goes ahead
    cli.main("prepare", prepare_data.main)
    assert "rebuilding" in capsys.readouterr().out and (root / "digits" / "meta.json").exists()


def test_a_run_reads_the_set_again_if_it_changed_before_the_set_was_held(digits_root, tmp_path):
    """Between preparing the set and holding it, another process may rebuild it: the run then reads it again under
    the lock, rather than train on the old meta.json's numbers over the new shards."""
    from data.meta import load_meta
    from data.rebuild import prepared_for_reading, readers_lock
    from training.errors import UserError
    from training.runlock import unshared

    d = tmp_path / "digits"
    shutil.copytree(Path(digits_root) / "digits", d, ignore=shutil.ignore_patterns("classifier"))
    calls, rebuilt = [], []

    def prepare():
        calls.append(load_meta(d))
        if not rebuilt:   # a rebuild lands right after this process read the set, before it holds it
            rebuilt.append(True)
            meta = json.loads((d / "meta.json").read_text())
            meta["channel_mean"] = [0.5]
            (d / "meta.json").write_text(json.dumps(meta))
        return calls[-1]
    with contextlib.ExitStack() as held:
        meta = prepared_for_reading(d, prepare, held)
        assert len(calls) == 2 and meta["channel_mean"] == [0.5]
        with pytest.raises(UserError, match="in use"):   # held: a rebuild now is refused
            with unshared(readers_lock(d), "in use"):
                pass
    calls.clear()
    with contextlib.ExitStack() as held:   # unchanged: read once
        prepared_for_reading(d, prepare, held)
    assert len(calls) == 1
    with unshared(readers_lock(d), "in use"):   # released with the stack
        pass


def test_locks_where_no_lock_file_can_be_made_leave_the_work_unguarded(tmp_path):
    """A read-only copy of a set (a shared disk, /proc here): its preparing, classifier and readers locks cannot be
    made there. The work runs without them (no one can write there either) instead of failing on the lock file."""
    from training.errors import UserError
    from training.runlock import exclusive, shared, unshared

    ran = []
    where = Path("/proc/self/dit-test.lock")
    with exclusive(where, "unused"), shared(where, "unused"), unshared(where, "unused"):
        ran.append(True)
    assert ran and not where.exists()
    (tmp_path / "a folder").mkdir()   # other errors are not taken for a read-only place
    with pytest.raises(IsADirectoryError), exclusive(tmp_path / "a folder", "unused"):
        pass
    lock = tmp_path / ".x.lock"   # and where it can: the readers' shared lock keeps the rebuild's out
    with shared(lock, "unused"), pytest.raises(UserError, match="busy"):
        with unshared(lock, "busy"):
            pass
