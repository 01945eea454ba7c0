"""sample.py, the script: its arguments (class ids, each mistake one line) and its npz written whole or not at all.
The sampler it calls is tested in test_sampling.py."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from training.cli import compose
from training.errors import UserError


def test_sample_py_labels_are_whole_class_ids():
    from sample import class_labels

    np.testing.assert_array_equal(class_labels(3, 10), [3])          # a scalar used to be a TypeError
    np.testing.assert_array_equal(class_labels(OmegaConf.create({"l": [1, 2.0]}).l, 10), [1, 2])
    for bad in ([1.7, 2], [0, 10], [-1], "a", [[1, 2]], [True], [[1, 2], [3]]):   # 1.7 used to become class 1
        with pytest.raises(UserError, match="must be class ids, whole numbers in \\[0, 10\\)"):
            class_labels(bad, 10)


def fake_run(path, step: int, config: str = "config", **over) -> str:
    """A checkpoint directory holding only the saved config of `step`: enough for what sample.py checks before it
    reads data or weights."""
    import json

    from omegaconf import OmegaConf as OC

    saved = OC.to_container(compose(config, [f"{k}={v}" for k, v in over.items()]), resolve=True)
    saved["model_spec"] = {"num_classes": 10}
    (path / str(step) / "config").mkdir(parents=True)
    (path / str(step) / "config" / "metadata").write_text(json.dumps(saved))
    return str(path)


def test_sample_py_refuses_bad_requests_in_one_line(tmp_path, monkeypatch, capsys):
    import sample
    from training import cli

    monkeypatch.chdir(tmp_path)   # the default out=samples.npz (and its lock) lands here, not in the repository

    stage1 = fake_run(tmp_path / "s1", 4, **{"train.steps": 16, "sampler.guidance": "auto"})
    stage2 = fake_run(tmp_path / "s2", 4, config="stage2")
    v_run = fake_run(tmp_path / "v", 4, **{"train.prediction": "v", "sampler.guidance": "cfg"})
    png = tmp_path / "mine.png"
    png.write_bytes(b"the user's own picture")
    for args, needle in (([f"ckpt_dir={stage1}", "chunk=-1"], "chunk=-1 is not allowed: chunk takes a whole number"),
                         ([f"ckpt_dir={stage1}", "steps=0"], "steps=0 is not allowed"),
                         ([f"ckpt_dir={stage1}", f"out={png}"], "must be a file name ending in .npz"),
                         ([f"ckpt_dir={stage1}", f"out={tmp_path / 'mine.png' / 'x.npz'}"], "cannot create its folder"),
                         ([f"ckpt_dir={stage1}", "step=3"], "holds no checkpoint of step 3: it holds steps [4]"),
                         ([f"ckpt_dir={stage1}/4"], f"is one step of a run: pass the run's folder, {stage1}, and "
                                                    "step=4"),
                         ([f"ckpt_dir={stage1}", "prompt=cat"], "prompt= is for text (stage-2) runs"),
                         ([f"ckpt_dir={stage1}", f"prompts_file={png}"], "prompts_file= is for text (stage-2) runs"),
                         ([f"ckpt_dir={stage2}", "prompt=cat", f"prompts_file={png}"],
                          "prompt= and prompts_file= both name the prompts"),
                         ([f"ckpt_dir={stage2}", "labels=[1,2]"], "labels= is for class-conditional (stage-1) runs"),
                         ([f"ckpt_dir={stage1}", "guide_step=8"], "guide_step=8 is not before the sampled step 4"),
                         ([f"ckpt_dir={stage1}"], "guide_step=8 is not before"),   # guide_fraction 0.5 of 16
                         ([f"ckpt_dir={stage2}", "evaluate=true"], "evaluate=true scores class-conditional runs"),
                         # options the chosen guidance or solver would ignore without a word (the audit found each)
                         ([f"ckpt_dir={stage1}", "guidance=cfg", "guide_scale=5"], "guide_scale is for guidance=auto"),
                         ([f"ckpt_dir={stage1}", "guidance=cfg", "guide_interval=[0.9,1.0]"],
                          "guide_interval is for guidance=auto"),
                         ([f"ckpt_dir={stage1}", "apg_eta=0.5"], "apg_eta is for guidance=apg"),
                         ([f"ckpt_dir={v_run}", "t_eps=0.9"], "this run predicts v: drop t_eps"),
                         ([f"ckpt_dir={stage1}", "guide_step=2", "rtol=1e-9"], "rtol is for the adaptive solvers"),
                         ([f"ckpt_dir={stage1}", "guide_step=2", "solver=tsit5", "zero_steps=1"],
                          "zero_steps is for the fixed-step solvers"),
                         # guide_ckpt_dir naming the run itself: its own-run rule (it guided away from itself)
                         ([f"ckpt_dir={stage1}", f"guide_ckpt_dir={stage1}"], "guide_step=8 is not before"),
                         # a mistyped weak run: named as guide_ckpt_dir (it said "pass ckpt_dir="), before any slow work
                         ([f"ckpt_dir={stage1}", "guide_step=2", f"guide_ckpt_dir={tmp_path / 'nope'}"],
                          f"guide_ckpt_dir={tmp_path / 'nope'}: no checkpoint directory"),
                         ([f"ckpt_dir={stage1}", "guide_step=2", "seed=4294967296"], "seed=4294967296 is not allowed"),
                         ([f"ckpt_dir={stage1}", "guide_step=2", "num_samples=1", "evaluate=true"],
                          "evaluate=true needs at least 2 images, and 1 were asked")):
        monkeypatch.setattr("sys.argv", ["sample.py", *args])
        with pytest.raises(SystemExit) as exit_:
            cli.main("sample", sample.main)
        out = capsys.readouterr()
        err = out.err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and needle in err[0], (args, err)
        assert "sampling" not in out.out, (args, out.out)   # refused before it says it samples (a weak step too)
    assert png.read_bytes() == b"the user's own picture"   # out=mine.png used to write mine.png.npz, then the grid here


@pytest.mark.parametrize("names_file", [True, False])
def test_sample_py_replaces_its_output_whole_or_not_at_all(tmp_path, monkeypatch, names_file):
    """A write cut short (disk full, a file-size limit, Ctrl-C) leaves the npz that was there and its evaluation, not
    half of a new one, in one line (zipfile's own errors at close name no file: that was a traceback, and the old
    .eval.json was already deleted); a finished one replaces the npz, reads back without pickle, and takes the
    replaced file's scores with it."""
    import errno

    import sample

    out, scores = tmp_path / "s.npz", tmp_path / "s.eval.json"
    np.savez(out, images=np.zeros((2, 4, 4, 1), np.uint8))
    scores.write_text('{"fd": 1.0}')
    before = out.read_bytes()
    real = np.savez

    def full_disk(path, **arrays):
        open(path, "wb").write(b"PK\x03\x04 half")
        if names_file:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(UserError, match="unchanged"):
        sample.write_npz(out, images=np.ones((3, 4, 4, 1), np.uint8))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.eval.json", "s.npz"]
    assert scores.read_text() == '{"fd": 1.0}'
    monkeypatch.setattr(np, "savez", real)
    sample.write_npz(out, images=np.ones((3, 4, 4, 1), np.uint8))
    assert np.load(out, allow_pickle=False)["images"].shape == (3, 4, 4, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_stopped_large_request_resumes_to_the_same_images(digits_root, tmp_path, monkeypatch, capsys):
    """sample.py num_samples=50000 held everything until the end: stopped at 90% (preemption, Ctrl-C), all of it was
    sampled again. Now a large request is sampled a part at a time, each part kept beside the npz; the rerun samples
    the missing parts only, and the images are the uninterrupted ones, byte for byte (the last part, shorter than a
    chunk, padded as the request's last chunk was)."""
    import sample
    import train_stage1
    import training.generate
    from conftest import tiny_overrides
    from training import cli

    ck = tmp_path / "run"
    train_stage1.main(compose("config", tiny_overrides(digits_root, str(ck), steps=2)))
    run = lambda out: (monkeypatch.setattr("sys.argv", ["sample.py", f"ckpt_dir={ck}", "num_samples=13", "chunk=3",
                                                        f"out={out}"]), cli.main("sample", sample.main))
    run(tmp_path / "whole.npz")                       # 13 images < 16 chunks: in one go, as before
    whole = np.load(tmp_path / "whole.npz")["images"]
    monkeypatch.setattr(sample, "PART_CHUNKS", 2)     # parts of 6: [0, 6), [6, 12), [12, 13)
    real, calls = training.generate.generate, []

    def stopped(*a, **kw):
        calls.append(kw["first"])
        if len(calls) == 1 and stopped.stop:   # the run's data set is held while sampling: no rebuild under it
            from data.rebuild import refuse_if_read
            from training.errors import UserError
            with pytest.raises(UserError, match="read"):
                refuse_if_read(Path(digits_root) / "digits")
        if len(calls) == 2 and stopped.stop:
            raise KeyboardInterrupt
        return real(*a, **kw)
    stopped.stop = True
    monkeypatch.setattr(training.generate, "generate", stopped)
    with pytest.raises(SystemExit) as stop:   # Ctrl-C: cli.main's exit code 130
        run(tmp_path / "s.npz")
    assert stop.value.code == 130
    assert not (tmp_path / "s.npz").exists() and [p.name for p in (tmp_path / ".s.npz.parts").iterdir()] != []
    stopped.stop, calls[:] = False, []
    # Another sample.py writing this out= (a job submitted twice, a sweep in two terminals) mixed its parts into
    # this one's npz, or deleted the parts folder under it: one line naming it now, and its parts are left alone
    from training.runlock import RunLock
    held = RunLock(tmp_path, name=".s.npz.lock").acquire()   # flock belongs to the open file: as another process's
    try:
        parts = sorted(p.name for p in (tmp_path / ".s.npz.parts").iterdir())
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            run(tmp_path / "s.npz")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert refused.value.code == 2 and "another sample.py (pid" in line and "choose another out=" in line, line
        assert sorted(p.name for p in (tmp_path / ".s.npz.parts").iterdir()) == parts and calls == []
    finally:
        held.release()
    (tmp_path / ".s.tmp-99999.npz").write_bytes(b"PK half of 20 GB")   # a sample.py killed while writing the npz
    capsys.readouterr()
    run(tmp_path / "s.npz")
    assert calls == [6, 12] and "resuming: 1 of 3 parts" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npz")["images"].tobytes() == whole.tobytes()
    assert not (tmp_path / ".s.npz.parts").exists() and not (tmp_path / ".s.tmp-99999.npz").exists()
    # The run deleted and trained again into the same ckpt_dir (same path, same step numbers, other weights): the
    # parts a stopped request left are not its images
    import training.checkpoint as checkpoint
    import training.checksums as checksums
    stopped.stop, calls[:] = True, []
    with pytest.raises(SystemExit):
        run(tmp_path / "u.npz")
    stopped.stop, calls[:] = False, []
    assert checksums.step_digest(ck, 2) is not None   # what the key holds for a real checkpoint
    monkeypatch.setattr(checksums, "step_digest", lambda *a: "the weights of another run")
    capsys.readouterr()
    run(tmp_path / "u.npz")
    assert calls == [0, 6, 12] and "resuming" not in capsys.readouterr().out
    # A run still training into ckpt_dir removes old steps (keep_ckpts) while sample.py starts: the step it picked was
    # gone when read, and the line called the checkpoint damaged ("move that directory out"): wrong and alarming
    import shutil

    read = checkpoint.Checkpointer._restore

    def pruned_meanwhile(self, step, args):
        shutil.rmtree(self.directory / str(step))
        return read(self, step, args)
    monkeypatch.setattr(checkpoint.Checkpointer, "_restore", pruned_meanwhile)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(tmp_path / "t.npz")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was removed while it was read" in line and "run again" in line and "damaged" not in line, line
    assert "steps [2]" not in line, line   # not listed as held (Orbax's cached list still named the removed step)
