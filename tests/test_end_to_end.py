"""The whole pipeline as a user runs it: train_stage1.py -> sample.py (from a non-default preset) -> evaluation."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, tiny_overrides
from training.errors import UserError
from training.checkpoint import read_config
from training.generate import check_weak_run, guide_step, load_weak


def run_script(*args, env_extra=None, check=True):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_train_then_sample_from_checkpoint(digits_root, tmp_path):
    ckpt = tmp_path / "run"
    # A non-default preset (B-8 shape family, shrunk) and patch 2: sample.py must rebuild it from the checkpoint. One
    # loader worker process, as users with spare cores run.
    # Autoguidance as in the shipped config: guide_step null = 1/2 of 14 steps = step 7, saved and kept although it
    # is neither a multiple of ckpt_every nor among the keep_ckpts=1 latest.
    over = tiny_overrides(digits_root, str(ckpt), steps=14, **{"model.hidden_size": 48, "model.num_heads": 3,
                                                                "train.sample_every": 14, "train.ckpt_every": 3,
                                                                "train.keep_ckpts": 1, "sampler.guidance": "auto",
                                                                "data.workers": 1})
    p = run_script("train_stage1.py", *over)
    assert "parameters" in p.stdout and "GFLOPs" in p.stdout and "compiling" in p.stdout
    # Batches from the worker process come in shared memory: every block is freed before exit, none left to warn
    assert "leaked shared_memory" not in p.stderr, p.stderr[-2000:]
    assert sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit()) == [7, 14]
    # step 7 sheds its params and optimizer state once newer steps follow it: autoguidance reads only its EMA
    assert {d.name for d in (ckpt / "7").iterdir() if d.is_dir()} == {"ema", "train", "data", "config", "checksums"}
    assert (ckpt / "14" / "params").is_dir() and not list((ckpt / ".deleted").iterdir())
    assert list((ckpt / "samples").glob("*.png"))
    assert (ckpt / "samples" / "rows.txt").read_text().splitlines() == [f"{i + 1}\t{i}" for i in range(10)]  # classes
    out = tmp_path / "s" / "samples.npz"
    # autoguidance with the step-7 EMA as the weak model (and plain guidance on top)
    p = run_script("sample.py", f"ckpt_dir={ckpt}", "num_samples=12", "cfg_scale=2.0", f"out={out}",
                   "solver=heun", "steps=3", "evaluate=true")
    assert "autoguidance 1.5 from step 7" in p.stdout
    z = np.load(out, allow_pickle=False)
    assert z["images"].shape == (12, 8, 8, 1) and z["images"].dtype == np.uint8
    np.testing.assert_array_equal(z["arr_0"], z["images"])
    np.testing.assert_array_equal(z["arr_1"], z["labels"])
    made = json.loads(str(z["request"]))   # what made them, read without pickle
    assert made["step"] == 14 and made["seed"] == 0 and made["sampler"]["solver"] == "heun"
    assert made["sampler"]["guide_step"] == 7   # the weak step it read (the request said null: half the run)
    assert len(made["labels"]) == 12
    assert sorted(np.bincount(z["labels"], minlength=10).tolist()) == [1] * 8 + [2] * 2
    assert out.with_suffix(".png").is_file()
    res = json.loads(out.with_suffix(".eval.json").read_text())
    assert {"cond_acc", "fd", "fd_floor"} <= set(res)
    with pytest.raises(UserError, match=r"guide_step=4 .* holds steps \[7, 14\]"):
        load_weak(ckpt, OmegaConf.create({"guidance": "auto", "guide_step": 4}), None, OmegaConf.create({"steps": 14}))
    p = run_script("sample.py", f"ckpt_dir={ckpt}", "guide_step=4", check=False)   # the refusal alone, first
    assert p.returncode == 2 and "holds steps [7, 14]" in p.stderr and "sampling" not in p.stdout, p.stdout
    # The weak model named as another run's directory (here a copy of this run, at step 7: the same weights as the
    # default) gives the same samples bit for bit; a run with other inputs or another prediction target is refused.
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    out2 = tmp_path / "s" / "other.npz"
    p = run_script("sample.py", f"ckpt_dir={ckpt}", "num_samples=12", "cfg_scale=2.0", f"out={out2}", "solver=heun",
                   "steps=3", f"guide_ckpt_dir={copy}", "guide_step=7")
    assert f"autoguidance 1.5 from {copy}" in p.stdout
    np.testing.assert_array_equal(np.load(out2)["images"], z["images"])
    p = run_script("sample.py", f"ckpt_dir={ckpt}", "guidance=cfg", f"guide_ckpt_dir={ckpt}", check=False)
    assert p.returncode == 2 and "add guidance=auto" in p.stderr and "Traceback" not in p.stderr
    # The run itself named as guide_ckpt_dir is held to its own rule: the weak EMA must come before the sampled one
    p = run_script("sample.py", f"ckpt_dir={ckpt}", f"guide_ckpt_dir={ckpt}", "guide_step=14", check=False)
    assert p.returncode == 2 and "guide_step=14 is not before the sampled step 14" in p.stderr, p.stderr
    saved = read_config(ckpt)[0]
    strong = SimpleNamespace(input_size=(8, 8), in_channels=1, num_classes=7)
    with pytest.raises(UserError, match=r"num_classes 10 vs 7"):
        check_weak_run(saved, strong, OmegaConf.create(saved["train"]), ckpt)
    with pytest.raises(UserError, match=r"prediction x vs v"):
        check_weak_run(saved, SimpleNamespace(input_size=(8, 8), in_channels=1, num_classes=10),
                       OmegaConf.merge(saved["train"], {"prediction": "v"}), ckpt)


def test_guide_step_from_fraction_and_from_older_configs():
    tc = OmegaConf.create({"steps": 1200})
    auto = lambda **kw: OmegaConf.create({"guidance": "auto", "guide_step": None, **kw})
    assert guide_step(auto(guide_fraction=0.75), tc) == 900
    assert guide_step(auto(guide_fraction=0.75, guide_step=300), tc) == 300    # an explicit step wins
    # a run saved before guide_fraction existed kept its EMA at 5/12 of the run: sample.py must still find it
    assert guide_step(auto(), tc) == 500
    assert guide_step(OmegaConf.create({"guidance": "cfg", "guide_fraction": 0.75}), tc) is None


def test_user_errors_are_one_line(digits_root, tmp_path):
    cases = [
        (["train.lrr=1"], {}, "lrr"),
        (["model=nope"], {}, "Could not find 'model/nope'. The model presets are: B-2, B-4"),
        (["data=fashion_mnist"], {"FASHION_MNIST_DIR": str(tmp_path / "absent"),
                                  "DIT_DATA_ROOT": str(tmp_path / "empty")}, "apt-get install"),
        (tiny_overrides(digits_root, str(tmp_path / "none"), **{"train.is_restore": True}), {}, "no checkpoint"),
    ]
    for args, env, needle in cases:
        p = run_script("train_stage1.py", *args, env_extra=env, check=False)
        lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
