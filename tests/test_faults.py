"""Fault matrix: the real train_stage1.py in a subprocess, killed (-9), preempted (SIGTERM), interrupted (SIGINT),
fed NaNs, and pointed at a full or unwritable disk. Resumed runs must end bitwise equal to an uninterrupted one."""

import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import assert_same_state, restore_final, tiny_overrides
from faults_helpers import SIGINT, SIGKILL, SIGTERM, Script, complete_steps, partial_saves, run_script

T = 30  # steps of every run in the kill chain
COMMON = {"data.hflip": True, "train.lr": 3e-3, "train.log_every": 1, "train.ckpt_every": 2}

# One process after another on the same checkpoint directory; each is stopped at its moment, the next resumes.
# (stdout line to wait for, extra delay in s, signal). "[step k]" is printed just before the (asynchronous)
# checkpoint of an even step k starts, so kills shortly after an even step land while that save is being written.
CHAIN = [
    (r"^model ", 0.0, SIGKILL),              # start-up: nothing saved yet
    (r"^compiling", 0.3, SIGKILL),           # while compiling / loading the compiled step
    (r"^compiled", 0.0, SIGKILL),            # first step done, no checkpoint yet
    (r"^\[step 2\]", 0.02, SIGKILL),         # during the first save
    (r"^\[step 5\]", 0.0, SIGKILL),          # between saves
    (r"^\[step 8\]", 0.05, SIGKILL),         # mid-save
    (r"^resumed from", 0.0, SIGKILL),        # right after a restore, before the first resumed step
    (r"^\[step 12\]", 0.1, SIGKILL),         # mid-save, later
    (r"^\[step 15\]", 0.15, SIGKILL),        # during the step after a save (save may still be in flight)
    (r"^\[step 18\]", 0.0, SIGKILL),         # at the start of a save
    (r"^\[step 21\]", 0.0, SIGTERM),         # preemption: finish the step, save, exit 0
    (r"^\[step 25\]", 0.0, SIGINT),          # Ctrl-C: same
    (rf"^\[step {T}\]", 0.0, SIGKILL),       # during the final save / the wait for it before exit
]


def error_lines(stderr: str) -> list[str]:
    """stderr without library log noise (Orbax's "WARNING:absl:Waiting for previous save ..." on a busy machine)."""
    return [l for l in stderr.strip().splitlines() if l.strip() and not l.startswith(("WARNING:absl:", "INFO:absl:"))]


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ref") / "run")
    rc, s = run_script(tiny_overrides(digits_root, ckpt, steps=T, **COMMON))
    assert rc == 0, s.output()
    return restore_final(ckpt, digits_root)


def test_kill_matrix_resumes_bitwise(digits_root, tmp_path, reference):
    ckpt = str(tmp_path / "run")
    report, last_resumed, t0 = [], -1, time.monotonic()
    for pattern, delay, sig in CHAIN:
        restore = bool(complete_steps(ckpt))
        s = Script(tiny_overrides(digits_root, ckpt, steps=T, **COMMON, **{"train.is_restore": restore}))
        if restore:
            line = s.wait_for(r"^resumed from")
            resumed = int(re.search(r"at step (\d+)", line).group(1))
            # The latest *complete* checkpoint, never a partial one, and never behind an earlier resume.
            assert resumed == max(complete_steps(ckpt)) and resumed >= last_resumed, (resumed, complete_steps(ckpt))
            last_resumed = resumed
        if pattern == r"^resumed from" and restore:
            pass  # already there
        else:
            s.wait_for(pattern)
        s.signal(sig, delay)
        rc = s.finish()
        tmp = partial_saves(ckpt)
        report.append((pattern, delay, sig.name, rc, complete_steps(ckpt), tmp))
        print(report[-1], round(time.monotonic() - t0, 1), flush=True)
        if sig == SIGKILL:
            assert rc == -9, s.output()
        else:  # preemption / Ctrl-C: clean exit with a checkpoint at the step it stopped
            assert rc == 0, s.output()
            stopped = int(re.search(rf"stopped by {sig.name} at step (\d+)", "".join(s.lines)).group(1))
            assert max(complete_steps(ckpt)) == stopped and not tmp, (stopped, complete_steps(ckpt), tmp)
    rc, s = run_script(tiny_overrides(digits_root, ckpt, steps=T, **COMMON, **{"train.is_restore": True}))
    assert rc == 0, s.output()
    print("\n".join(map(str, report)))
    # At least one kill landed in the middle of an asynchronous save (a temporary step directory was left).
    assert any(r[5] for r in report), report
    assert_same_state(restore_final(ckpt, digits_root), reference)


def test_old_checkpoints_leave_through_an_atomic_rename(digits_root, tmp_path):
    """keep-last-N deletes old steps by renaming them into TRASH first: a kill -9 in the middle of deleting one
    (the kill matrix once caught a half-deleted `4/` that the next run refused as foreign) can then only leave
    debris inside TRASH, which the next start removes before resuming."""
    from training.checkpoint import TRASH
    ckpt = tmp_path / "run"
    # Stopped at 6 of 8 steps (a resume may not change train.steps: it shapes the cosine).
    rc, s = run_script(tiny_overrides(digits_root, str(ckpt), steps=8, **{"train.ckpt_every": 2, "train.keep_ckpts": 1,
                                                                           "train.stop_at_step": 6}))
    assert rc == 0, s.output()
    assert complete_steps(ckpt) == [6]
    assert (ckpt / TRASH).is_dir() and not any((ckpt / TRASH).iterdir())   # renamed there by Orbax, emptied by us
    debris = ckpt / TRASH / "4" / "opt_state"   # what an rmtree killed halfway leaves: part of one item
    debris.mkdir(parents=True)
    (debris / "manifest.ocdbt").write_bytes(b"x")
    rc, s = run_script(tiny_overrides(digits_root, str(ckpt), steps=8, **{"train.ckpt_every": 2, "train.keep_ckpts": 1,
                                                                           "train.is_restore": True}))
    assert rc == 0 and any(l.startswith("resumed from") for l in s.lines), s.output()
    assert complete_steps(ckpt) == [8] and not any((ckpt / TRASH).iterdir())


def test_nan_batch_skips_the_update(digits_root):
    """The jitted step with a NaN batch: params, optimizer state and EMA stay bit-identical; counters count it."""
    import jax
    import numpy as np

    from data.loader import make_iterator
    from data.meta import load_meta
    from models import build_model, model_spec
    from training.cli import compose
    from training.optim import make_optimizer
    from training.state import init_state, split_keys
    from training.step import make_train_step

    cfg = compose("config", tiny_overrides(digits_root, "unused"))
    meta = load_meta(f"{digits_root}/digits")
    spec = model_spec(cfg.model, meta)
    model_key, train_key = split_keys(0)
    opt, sched = make_optimizer(cfg.train, cfg.optim)
    state = init_state(build_model(spec, key=model_key), opt, train_key)
    step = make_train_step(cfg.train, opt, sched, spec["num_classes"])
    batch = next(make_iterator(meta, f"{digits_root}/digits", "train", batch_size=32, seed=0))
    state, m = step(state, batch)  # one good step, so the optimizer state is not all zeros
    assert int(m["skipped"]) == 0 and float(m["lr"]) == float(sched(0))
    copy = lambda s: jax.tree.map(lambda a: np.array(a) if isinstance(a, jax.Array) else a, s)
    before = copy(state)
    for i, bad in enumerate(({**batch, "x": np.full_like(batch["x"], np.nan)},
                             {**batch, "x": np.full_like(batch["x"], np.inf)}), start=1):
        state, m = step(state, bad)
        assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
        assert int(state.bad_steps) == i and int(state.skipped) == i and int(state.step) == int(before.step) + i
        for name in ("params", "opt_state", "ema"):
            for x, y in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(state, name))):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    state, m = step(state, batch)  # a good step resets the streak (not the total)
    assert int(m["skipped"]) == 0 and int(state.bad_steps) == 0 and int(state.skipped) == 2
    # The skipped steps did not advance the optimizer's schedule: this was its 2nd update, at sched(1) (warm-up:
    # half the peak), not sched(3) = the step counter's; the logged lr is the one used.
    counts = {int(c) for c in jax.tree.leaves(before.opt_state)
              if np.ndim(c) == 0 and np.issubdtype(np.asarray(c).dtype, np.integer)}
    assert counts == {1}, counts   # the optimizer's own step counts before this update
    assert float(m["lr"]) == float(sched(1)) != float(sched(3))


def test_stop_flag_gives_the_signals_back():
    """After the loop (final sampling, evaluation) Ctrl-C and SIGTERM act as before it, not as a request to
    checkpoint that nobody reads any more."""
    import signal

    from training.loop import StopFlag

    def mine(signum, frame):
        pass
    old = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopFlag()
        assert all(signal.getsignal(s) == stop._handle for s in old)
        stop.restore()
        assert all(signal.getsignal(s) is mine for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_sigterm_in_the_final_grid_keeps_the_wandb_history(digits_root, tmp_path):
    """After the last checkpoint, SIGTERM (preemption during the final grid or evaluation) had its default action
    back: the process died at once, W&B never closed, and the offline run file held its 7-byte header only (a
    fresh run's whole history lost). Now it stops as a Ctrl-C does (exit 130) and the history is written."""
    import os
    import sys

    code = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
import train_stage1, training.loop as loop
from training import cli
real = loop.generate
def final_grid(*a, **kw):   # sample_every=0: the first grid is the final one
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **kw)
loop.generate = final_grid
sys.argv = ["train_stage1.py", *sys.argv[1:]]
cli.main("config", train_stage1.main)
"""
    over = tiny_overrides(digits_root, str(tmp_path / "run"), steps=4, **{"wandb.mode": "offline",
                                                                           "wandb.dir": str(tmp_path / "wb")})
    p = subprocess.run([sys.executable, "-c", code, *over], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "WANDB_MODE"})
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    runs = list((tmp_path / "wb").rglob("*.wandb"))
    assert len(runs) == 1 and b"train/loss" in runs[0].read_bytes(), [(r, r.stat().st_size) for r in runs]


def test_wandb_online_without_login_is_one_line(tmp_path, monkeypatch):
    """wandb.mode=online with no API key: a UserError saying what to do, not wandb's UsageError traceback (the loop
    starts the tracker inside the block that closes the checkpointer on any error)."""
    from omegaconf import OmegaConf

    from training.errors import UserError
    from training.tracking import Tracker

    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))            # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = OmegaConf.create({"mode": "online", "project": "p", "entity": None, "name": None, "dir": str(tmp_path)})
    with pytest.raises(UserError) as e:
        Tracker(cfg, {"a": 1})
    msg = str(e.value)
    assert "\n" not in msg and "wandb login" in msg and "wandb.mode=offline" in msg, msg


def test_nan_streak_stops_the_run(digits_root, tmp_path):
    """A streak shorter than max_bad_steps is survived; one of exactly max_bad_steps stops the run with one line
    naming the last good checkpoint (exit 2); the checkpoints are complete and hold finite weights."""
    import numpy as np

    ckpt = tmp_path / "run"
    rc, s = run_script(tiny_overrides(digits_root, str(ckpt), steps=40, **{
        "train.max_bad_steps": 3, "train.log_every": 5, "train.ckpt_every": 4,
        "train.debug_nan_steps": "[3,4,9,10,11,12]"}))
    lines = error_lines(s.stderr)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in s.stderr, s.output()
    # Steps 3-4 (a streak of 2) are survived; 9, 10, 11 reach 3 and stop the run at its next check (step 12 at the
    # latest: checks run every min(log_every, max_bad_steps) = 3 steps and before each save).
    assert "3 non-finite steps in a row (steps 9-11" in lines[0], lines[0]
    assert f"last good checkpoint: {ckpt / '8'}" in lines[0] and "is_restore" in lines[0], lines[0]
    assert complete_steps(ckpt) == [4, 8] and not partial_saves(ckpt)
    state, _ = restore_final(str(ckpt), digits_root)
    assert int(state.skipped) == 2 and int(state.bad_steps) == 0
    import jax
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))


def _mount_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if p.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.decode().strip()[:100]}")


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MiB tmpfs: room for one checkpoint of the tiny model (~1.1 MB), not two."""
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "1600k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_at_save_time(digits_root, small_disk):
    ckpt = small_disk / "run"
    rc, s = run_script(tiny_overrides(digits_root, str(ckpt), steps=12, **{"train.ckpt_every": 2}))
    # Said at start: the disk has room for fewer checkpoints than the run holds, keep_ckpts (3) + one being written
    warned = [l for l in s.lines if l.startswith("warning:") and "MiB free, room for 2 more checkpoint(s)" in l]
    assert warned and "holds up to 4 at once" in warned[0], "".join(s.lines[:4])
    # Orbax's writer threads log their own ERROR:absl lines (and may print more at interpreter exit); ours is the one
    # "error:" line.
    # Those threads write concurrently, so our line may be glued to the end of one of theirs: look for it anywhere.
    msg = "error: writing a checkpoint"
    ours = [l[l.index(msg):] for l in s.stderr.splitlines() if msg in l]
    assert rc == 2 and len(ours) == 1, [l[:300] for l in s.stderr.splitlines() if "error" in l.lower()][:8]
    last = ours[0]
    assert last.startswith("error: writing a checkpoint") and "No space left on device" in last, s.output()
    done = complete_steps(ckpt)
    assert done and f"last complete checkpoint is step {done[-1]}" in last, (done, last)
    state, _ = restore_final(str(ckpt), digits_root)  # the previous checkpoint is intact and restores
    assert int(state.step) == done[-1]


def test_disk_full_before_training(digits_root, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (1400 * 1024))  # leaves less than one checkpoint free
    rc, s = run_script(tiny_overrides(digits_root, str(small_disk / "run"), steps=4))
    lines = error_lines(s.stderr)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in s.stderr, s.output()
    assert ("MiB free but one checkpoint needs" in lines[0] or "No space left" in lines[0]), lines[0]
    assert "compiling" not in "".join(s.lines)


def test_disk_full_while_preparing_is_one_line_and_leaves_no_partial_shard(tmp_path):
    """A full disk while writing shards ended in ArrayRecord's RuntimeError traceback, and the partial shard
    (`.<name>.tmp-<pid>`, up to 512 MB for a folder) stayed: close() raised before the unlink, and later runs only
    cleared finished shards. Now: one line; no temp file, after the failure or after the next run."""
    import sys

    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "200k")   # digits' shards need ~460 KB
    try:
        cmd = [sys.executable, str(Path(__file__).parent.parent / "prepare_data.py"), "data=digits",
               f"data.root={mnt}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = error_lines(p.stderr)
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert lines[0].startswith("error: writing ") and "No space left on device" in lines[0], lines[0]
        assert not list((mnt / "digits").glob(".*.tmp-*"))
        stale = mnt / "digits" / ".train-00000-of-00001.array_record.tmp-99999"   # as a killed run leaves it
        stale.write_bytes(b"x")
        subprocess.run(["mount", "-o", "remount,size=2m", str(mnt)], check=True)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert not stale.exists() and (mnt / "digits" / "meta.json").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_sampler_setting_that_fails_skips_grids_not_the_run(digits_root, tmp_path, capsys):
    """A guidance scale that overflows fp32 fails every grid. Mid-run that cost the steps since the last checkpoint
    (the error ended the run); now each such grid is one skipped line, training goes on, and the final grid raises
    the error only after the last save."""
    import train_stage1
    from training.cli import compose
    from training.errors import UserError

    ckpt = str(tmp_path / "ck")
    with pytest.raises(UserError, match="non-finite images"):
        train_stage1.main(compose("config", tiny_overrides(digits_root, ckpt, steps=6, **{
            "train.ckpt_every": 4, "train.sample_every": 2, "sampler.cfg_scale": 1e39})))   # inf in fp32
    assert re.findall(r"sample grid at step (\d+) skipped", capsys.readouterr().out) == ["2", "4"]
    assert complete_steps(ckpt)[-1] == 6
