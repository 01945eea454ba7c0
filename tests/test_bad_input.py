"""Bad input table: each case ends in one line on stderr ("error: ..."), exit code 2, no traceback, and deletes
nothing. Runs train_stage1's entry point in-process (the subprocess path is covered by test_end_to_end)."""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

import train_stage1
from conftest import tiny_overrides
from data.records import decode_record, encode_record
from faults_helpers import complete_steps, partial_saves, run_cli
from models import build_model
from training import cli
from training.checkpoint import Checkpointer, read_config
from training.errors import UserError


def snapshot(*dirs) -> dict:
    """Every file under the given directories with its size (to prove nothing was deleted or truncated)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                out[str(p)] = p.stat().st_size
    return out


def ok_cli(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["train_stage1.py", *args])
    cli.main("config", train_stage1.main)


@pytest.fixture
def data_copy(digits_root, tmp_path):
    """A private copy of the prepared digits set that a test may damage: (root, digits dir, meta, train shard)."""
    root = tmp_path / "data"
    shutil.copytree(Path(digits_root) / "digits", root / "digits", ignore=shutil.ignore_patterns("classifier"))
    d = root / "digits"
    meta = json.loads((d / "meta.json").read_text())
    return root, d, meta, d / meta["splits"]["train"]["files"][0]


def rewrite_record(shard: Path, index: int, make) -> None:
    """Replace record `index` of an ArrayRecord shard with make(decoded original) (same record count)."""
    r = ArrayRecordReader(str(shard))
    raws = r.read_all()
    r.close()
    raws[index] = make(decode_record(raws[index]))
    w = ArrayRecordWriter(str(shard), "group_size:1")
    for raw in raws:
        w.write(raw)
    w.close()


def test_missing_and_empty_data_directory(monkeypatch, capsys, tmp_path):
    ck = str(tmp_path / "ck")
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(tmp_path / "absent"), ck, **{"data.name": "mine"}))
    assert "no prepared data set" in line and "prepare_data.py" in line
    (tmp_path / "empty" / "mine").mkdir(parents=True)
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(tmp_path / "empty"), ck, **{"data.name": "mine"}))
    assert "no prepared data set" in line
    assert (tmp_path / "empty" / "mine").is_dir()


@pytest.mark.parametrize("damage,needle", [
    ("missing", "is missing"),
    ("truncated", "not a readable ArrayRecord"),
    ("newer_meta", "format_version 2"),
    ("garbage_meta", "cannot read"),
])
def test_damaged_data_set_fails_before_training(monkeypatch, capsys, data_copy, tmp_path, damage, needle):
    root, d, meta, shard = data_copy
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "newer_meta":
        (d / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    elif damage == "garbage_meta":
        (d / "meta.json").write_bytes(b"\x00\xff not json")
    before = snapshot(d)
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(root), str(tmp_path / "ck")))
    assert needle in line, line
    assert snapshot(d) == before
    assert not complete_steps(tmp_path / "ck")


BAD_RECORDS = {
    "label_out_of_range": (lambda r: encode_record({"x": r["x"]}, label=42), "'label' should be a class id in [0, 10)"),
    "negative_label": (lambda r: encode_record({"x": r["x"]}, label=-1), "got -1"),
    "wrong_shape": (lambda r: encode_record({"x": np.zeros((4, 4, 1), np.uint8)}, label=1), "(4, 4, 1)"),
    "wrong_dtype": (lambda r: encode_record({"x": r["x"].astype(np.float32)}, label=1), "float32"),
    "newer_record": (lambda r: b"\x81\xa1v\x07", "record format version 7"),
    "not_a_record": (lambda r: b"\x93\x01\x02\x03", "not a data record"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_mid_run_is_one_line_and_keeps_checkpoints(monkeypatch, capsys, data_copy, tmp_path, case):
    """A bad record is met inside the Grain iterator during training: one line naming the shard and record, the
    checkpoints written before it stay complete (the manager is closed cleanly), and nothing is deleted."""
    make, needle = BAD_RECORDS[case]
    root, d, meta, shard = data_copy
    n = meta["splits"]["train"]["num_records"]
    rewrite_record(shard, n - 1, make)
    ck = tmp_path / "ck"
    before = snapshot(d)
    # One epoch is n // 32 = 42 batches: the bad record is met within the first 42 steps, after some checkpoints.
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(root), str(ck), steps=60, **{"train.ckpt_every": 2}))
    assert needle in line and f"record {n - 1}" in line and shard.name in line, line
    assert "re-prepare the data set" in line and "train.is_restore=true" in line, line
    assert snapshot(d) == before
    assert not partial_saves(ck)


def test_corrupted_shard_bytes(monkeypatch, capsys, data_copy, tmp_path):
    """Bytes overwritten inside the record chunks (the index at the end still reads): one line, not a crash."""
    root, d, meta, shard = data_copy
    b = bytearray(shard.read_bytes())
    mid = len(b) // 3
    b[mid: mid + 4096] = bytes(range(256)) * 16
    shard.write_bytes(bytes(b))
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(root), str(tmp_path / "ck"), steps=60))
    assert shard.name in line or "record" in line, line


def test_config_mistakes(monkeypatch, capsys, digits_root, tmp_path):
    ck = str(tmp_path / "ck")
    for extra, needle in ((["optim.nope=1"], "nope"), (["data=nope"], "nope"), (["train=nope"], "nope"),
                          (["train.steps=[1"], "bad configuration"),
                          (["wandb.name=man’s shoe"], "Quote a value with spaces or special characters"),
                          (["sampler.cfg_interval=[0.7,0.2]"], "cfg_interval"), (["sampler.solver=rk4"], "solver"),
                          (["sampler.guidance=nope"], "guidance"), (["train.prediction=eps"], "train.prediction"),
                          (["train.time_sampling=normal"], "time_sampling"),
                          (["train.route=[1,3,0.5]"], "model.depth (2)"), (["train.route=[0,2,2]"], "0 < keep <= 1"),
                          (["sampler.guidance=auto", "sampler.guide_step=8"], "guide_step"),
                          (["sampler.guidance=auto", "sampler.guide_fraction=1.0"], "sampler.guide_fraction takes a number in (0, 1)"),
                          # an interpolation that cannot resolve was an OmegaConf traceback from the override checks
                          (["train.ckpt_dir=${oc.env:DIT_SURELY_UNSET}/run"], "train.ckpt_dir: KeyError raised while "
                           "resolving interpolation: \"Environment variable 'DIT_SURELY_UNSET' not found\""),
                          (["train.ckpt_dir=${data.nope}/run"], "train.ckpt_dir: Interpolation key 'data.nope'"),
                          (["mesh.data=1.5"], "mesh.data takes a whole number >= 1, or -1"),
                          (["mesh.fsdp=0"], "mesh.fsdp takes a whole number >= 1, or -1")):
        line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, ck) + extra)
        assert needle in line, line
    assert not Path(ck).exists()


def sample_cli(monkeypatch, capsys, args, fails=True) -> str:
    """sample.py <args> in-process: the single error line (exit 2), or stdout when fails=False."""
    import sample

    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    capsys.readouterr()
    if not fails:
        cli.main("sample", sample.main)
        return capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main("sample", sample.main)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_resume_and_evaluation_need_the_data_the_run_saw(monkeypatch, capsys, data_copy, tmp_path):
    from data.builtin import BUILTIN_SPLITS, load_builtin
    from data.prepare import prepare_arrays

    root, d, _, _ = data_copy
    ck = tmp_path / "ck"
    ok_cli(monkeypatch, tiny_overrides(str(root), str(ck), steps=2, **{"train.ckpt_every": 2}))
    saved, step = read_config(str(ck))
    assert saved["data_identity"]["split_rule"] == BUILTIN_SPLITS["digits"]
    b = load_builtin("digits")
    # The set re-prepared from other files (10 training images fewer): the saved data position would index into
    # other records, and the test split may not be the one the run was kept from.
    prepare_arrays(d, "digits", {"train": (b["train"][0][:-10], b["train"][1][:-10]), "test": b["test"]},
                   b["class_names"], b["source"], split_rule=b["split_rule"])
    before = snapshot(ck)
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(root), str(ck), steps=4, **{"train.is_restore": True}))
    assert "another copy of digits" in line and "records" in line, line
    sample_args = [f"ckpt_dir={ck}", "num_samples=4", f"out={tmp_path / 's.npz'}"]
    line = sample_cli(monkeypatch, capsys, sample_args + ["evaluate=true"])
    assert "another copy of digits" in line and "evaluate=false" in line, line
    assert snapshot(ck) == before
    # A run saved before checkpoints recorded their data trained digits on the old file-order split: refused too.
    prepare_arrays(d, "digits", {"train": b["train"], "test": b["test"]}, b["class_names"], b["source"],
                   split_rule=b["split_rule"])
    config_file = ck / str(step) / "config" / "metadata"
    old = json.loads(config_file.read_text())
    del old["data_identity"]
    config_file.write_text(json.dumps(old))
    line = run_cli(monkeypatch, capsys, tiny_overrides(str(root), str(ck), steps=4, **{"train.is_restore": True}))
    assert "last 20% of each class in file order" in line, line
    assert "file order" in sample_cli(monkeypatch, capsys, sample_args + ["evaluate=true"])
    stale = tmp_path / "s.eval.json"
    stale.write_text('{"fd_ratio": 1.0}')   # the scores of an earlier npz at this out=: they go with it
    assert "wrote" in sample_cli(monkeypatch, capsys, sample_args, fails=False)   # sampling alone is fine
    assert not stale.exists()


def test_resume_with_autoguidance_needs_its_weak_checkpoint(monkeypatch, capsys, digits_root, tmp_path):
    """A run started with plain guidance has no checkpoint at the weak step: resuming it with guidance=auto is refused
    at start, not after training when the final evaluation would look for it."""
    ck = str(tmp_path / "ck")
    ok_cli(monkeypatch, tiny_overrides(digits_root, ck, steps=8, **{"train.stop_at_step": 4}))
    before = snapshot(ck)
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, ck, steps=8, **{"train.is_restore": True,
                                                                                     "sampler.guidance": "auto",
                                                                                     "sampler.guide_fraction": 0.375}))
    assert "step 3" in line and "guidance=cfg" in line, line   # 3/8 of 8 steps, before the first run's end
    assert snapshot(ck) == before


def test_checkpoint_mistakes(monkeypatch, capsys, digits_root, tmp_path):
    ck = tmp_path / "ck"
    ok_cli(monkeypatch, tiny_overrides(digits_root, str(ck), steps=2, **{"train.ckpt_every": 2}))
    assert complete_steps(ck) == [2]
    before = snapshot(ck)
    # A different model: the keys that differ are named.
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(ck), steps=4, **{
        "train.is_restore": True, "model.depth": 3, "model.hidden_size": 48}))
    assert "different model" in line and "depth" in line and "hidden_size" in line, line
    assert "resume with the run's own model.hidden_size=32 model.depth=2, or use" in line, line   # what to paste
    # Another optimizer: its state cannot be restored from this one's.
    other = {"adamw": "muon", "muon": "adamw"}[cli.compose("config", []).optim.name]
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(ck), steps=4, **{
        "train.is_restore": True, "optim": other}))
    assert "trained with optim=" in line and f"resume with optim={other}" not in line, line
    assert snapshot(ck) == before
    if other == "adamw":   # the run is Muon's: the adaLN maps on Adam would be another state layout too
        line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(ck), steps=4, **{
            "train.is_restore": True, "optim.muon_modulation": False}))
        assert "optim.muon_modulation=true" in line and "Traceback" not in line, line
    # Resuming with the train.stop_at_step it stopped at trained one more step and stopped again, at every resume.
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(ck), steps=4, **{
        "train.is_restore": True, "train.resume_changes": True, "train.stop_at_step": 2}))
    assert "train.stop_at_step=2 but" in line and "already at step 2" in line, line
    assert snapshot(ck) == before
    # A fresh start into a directory of an existing run refuses to overwrite it.
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(ck), steps=4))
    assert "already holds checkpoints" in line and "is_restore" in line
    assert snapshot(ck) == before
    # A step directory that is not a checkpoint (someone's files): named, nothing deleted.
    junk = tmp_path / "junk"
    (junk / "7").mkdir(parents=True)
    (junk / "7" / "notes.txt").write_text("not a checkpoint")
    before = snapshot(junk)
    for restore in (True, False):
        line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(junk), steps=4,
                                                           **{"train.is_restore": restore}))
        assert "not a checkpoint" in line and "7" in line, line
        assert snapshot(junk) == before
    # is_restore with an empty directory.
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(tmp_path / "new"), steps=4,
                                                       **{"train.is_restore": True}))
    assert "holds no checkpoint" in line
    # A checkpoint whose tree this code does not build (another version of the code added or removed a module
    # field): the differing field is named in one line, not Orbax's tree diff. Here the template lacks `final`.
    saved, step = read_config(str(ck))
    model = build_model(saved["model_spec"], key=jax.random.PRNGKey(0))
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if not f.metadata.get("static")}
    del fields["final"]
    before = snapshot(ck)
    with Checkpointer(str(ck), create=False) as c, \
            pytest.raises(UserError, match=r"differs at: final\b.*another version"):
        c.restore_weights(fields, step)
    assert snapshot(ck) == before


def test_checkpoint_dir_under_a_file(monkeypatch, capsys, digits_root, tmp_path):
    """An unwritable checkpoint directory is refused before training starts (root ignores chmod, so the directory
    is made impossible instead: its parent is a regular file)."""
    f = tmp_path / "file"
    f.write_text("x")
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(f / "ck")))
    assert "not writable" in line and "train.ckpt_dir" in line
    assert f.read_text() == "x"


@pytest.mark.parametrize("config", [["data=digits"], ["data=emoji", "data.limit=2"]])
def test_prepare_force_keeps_sets_it_cannot_rebuild(monkeypatch, capsys, data_copy, config):
    """`prepare_data.py force=true` on a set that is not a built-in (e.g. latents, rebuilt only by their encode
    command) is refused before meta.json goes, instead of leaving a set that nothing can prepare again; with a
    captioned config (data=emoji) too, which used to replace it."""
    import prepare_data

    root, d, _, _ = data_copy
    mine = root / "mine"
    shutil.copytree(d, mine)
    before = snapshot(mine)
    line = run_cli(monkeypatch, capsys, [*config, "data.name=mine", f"data.root={root}", "force=true"],
                   script=prepare_data.main, config="prepare")
    assert "force=true" in line or "another data.name" in line, line
    assert snapshot(mine) == before


@pytest.mark.parametrize("fails", [True, False])
def test_prepare_force_rebuild_keeps_the_old_set_until_the_new_one_is_complete(monkeypatch, capsys, data_copy, fails,
                                                                               tmp_path):
    """`prepare_data.py data=digits force=true`: a rebuild that fails midway (here: the source cannot be read, as
    when Fashion-MNIST's package was removed) puts the complete old set back, classifier cache included; one that
    succeeds leaves the new set and no copy of the old one."""
    import data.prepare
    import prepare_data

    root, d, _, _ = data_copy
    (d / "classifier").mkdir()
    (d / "classifier" / "weights.eqx").write_bytes(b"cached")
    before = snapshot(d)
    if fails:
        def unreadable(name):
            raise UserError(f"{name} cannot be read")
        monkeypatch.setattr(data.prepare, "load_builtin", unreadable)
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", "data=digits", f"data.root={root}", "force=true"])
    capsys.readouterr()
    if fails:
        with pytest.raises(SystemExit) as exc:
            cli.main("prepare", prepare_data.main)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and "old copy is back" in err[0] and "cannot be read" in err[-1], err
        assert snapshot(d) == before
        assert not [p for p in root.iterdir() if ".replaced-" in p.name]      # no copy left aside
    else:   # the set lives elsewhere behind a symlink: rebuilt there, the link kept
        real = tmp_path / "disk" / "digits"
        real.parent.mkdir()
        shutil.move(d, real)
        d.symlink_to(real)
        cli.main("prepare", prepare_data.main)
        assert d.is_symlink() and not (real / "classifier").exists() and (real / "meta.json").exists()
        assert {k: v for k, v in snapshot(real).items() if "classifier" not in k} == {
            k.replace(str(d), str(real)): v for k, v in before.items() if "classifier" not in k}  # same shards
        assert not [p for p in real.parent.iterdir() if ".replaced-" in p.name]  # no copy left aside


@pytest.mark.parametrize("finished", [False, True])
def test_a_rebuild_killed_outright_is_undone_by_the_next_preparation(monkeypatch, capsys, data_copy, finished):
    """kill -9 (or power loss) during `force=true` leaves the old set in `.digits.replaced-<pid>` and a partial one in
    its place. The next run that prepares the set puts the old copy back (classifier cache included; a rebuild is
    made impossible here, so only a restore passes), or deletes it if the new set was completed."""
    import data.prepare

    root, d, _, shard = data_copy
    (d / "classifier").mkdir()
    (d / "classifier" / "weights.eqx").write_bytes(b"cached")
    before = snapshot(d)
    aside = root / ".digits.replaced-4194304"
    os.rename(d, aside)
    if finished:
        shutil.copytree(aside, d, ignore=shutil.ignore_patterns("classifier"))
    else:
        d.mkdir()
        (d / shard.name).write_bytes(b"half a shard")

    def no_rebuild(name):
        raise AssertionError("the set was rebuilt instead of restored")
    monkeypatch.setattr(data.prepare, "load_builtin", no_rebuild)
    capsys.readouterr()
    meta, _ = data.prepare.ensure_prepared("digits", root)
    out = capsys.readouterr().out
    assert not aside.exists() and meta["name"] == "digits"
    if finished:
        assert "removed" in out and not (d / "classifier").exists()
    else:
        assert "the complete old copy is back in place" in out and snapshot(d) == before


def test_a_second_run_into_a_busy_checkpoint_directory_is_refused(tmp_path):
    """Two runs writing to one train.ckpt_dir would interleave steps and delete each other's checkpoints; the second
    one's start-up would even remove the first's save in progress as a leftover. The writer holds a lock: a second
    writer is refused in one line naming the holder and touches nothing; readers (sample.py) are not held up; the
    directory is free again once the first run closes (or dies: the kernel drops the lock)."""
    import os

    ck = tmp_path / "ck"
    first = Checkpointer(str(ck))
    in_progress = ck / "500.orbax-checkpoint-tmp-1234"      # the first run's save, being written
    in_progress.mkdir()
    (in_progress / "part").write_bytes(b"x")
    before = snapshot(ck)
    with pytest.raises(UserError, match=rf"another run \(pid {os.getpid()} on .*\) is writing to {ck}: wait"):
        Checkpointer(str(ck))
    assert snapshot(ck) == before
    with Checkpointer(str(ck), create=False) as reader:
        assert reader.latest_step() is None
    first.close()
    Checkpointer(str(ck)).close()                            # free again
    assert not in_progress.exists()                          # and now a true leftover, cleaned at start
