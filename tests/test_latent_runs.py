"""A run on VAE latents depends on the VAE that encoded them: it is checked where a run starts and where sample.py
starts, not first at a sample grid (which cost the run every step since its last checkpoint) or after sampling."""

import os
import shutil
import sys

import pytest

from conftest import tiny_overrides
from faults_helpers import complete_steps, run_cli
from test_vae import make_tiny_vae, write_images
from training import cli


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _sample(monkeypatch, capsys, args) -> str:
    import sample

    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main("sample", sample.main)
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_latent_run_checks_its_vae_and_evaluation_at_start(monkeypatch, capsys, tmp_path):
    import train_stage1
    from data.encode import prepare_latents
    from data.vae import load_vae

    vae_dir = make_tiny_vae(tmp_path / "vae")
    for c in ("cat", "dog"):
        write_images(tmp_path / "src" / c, [f"{i}.png" for i in range(4)], seed=len(c))
    root = tmp_path / "data"
    prepare_latents(str(tmp_path / "src"), load_vae(vae_dir), root / "lat", resolution=8, progress=False)
    ck = tmp_path / "ck"
    over = tiny_overrides(str(root), str(ck), steps=2, **{"data": "folder", "data.name": "lat", "data.hflip": False,
                                                           "model.patch_size": 2, "train.batch_size": 4,
                                                           "train.ckpt_every": 2})
    # The default end-of-run evaluation cannot score latents of a folder: refused before training, not after it.
    line = run_cli(monkeypatch, capsys, [*over, "eval.at_end=true"])
    assert "eval.at_end=false" in line and complete_steps(ck) == [], line
    monkeypatch.setattr(sys, "argv", ["train_stage1.py", *over])
    cli.main("config", train_stage1.main)
    assert complete_steps(ck) == [2]
    out = str(tmp_path / "s.npz")
    # The prepared sets moved since the run (another disk): sample.py says how to point at them, and does.
    shutil.move(root, tmp_path / "data2")
    line = _sample(monkeypatch, capsys, [f"ckpt_dir={ck}", "num_samples=2", f"out={out}"])
    assert "pass data_root=" in line, line
    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt_dir={ck}", "num_samples=2", f"out={out}",
                                      f"data_root={tmp_path / 'data2'}"])
    import sample
    cli.main("sample", sample.main)
    assert os.path.exists(out)
    os.remove(out)
    shutil.move(tmp_path / "data2", root)
    # The VAE's weights replaced in place (retrained into the same folder): the latents would decode wrongly.
    other = make_tiny_vae(tmp_path / "other")
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(1)
    m = AutoencoderKL.from_pretrained(other)
    for p in m.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    m.save_pretrained(vae_dir)
    load_vae.cache_clear()
    line = _sample(monkeypatch, capsys, [f"ckpt_dir={ck}", "num_samples=2", f"out={out}"])
    assert "weights of the VAE" in line and "changed" in line and not os.path.exists(out), line
    # The VAE moved away: a new run into another directory stops before training, naming the VAE and what to do.
    shutil.move(vae_dir, tmp_path / "moved")
    load_vae.cache_clear()
    ck2 = tmp_path / "ck2"
    line = run_cli(monkeypatch, capsys, [o for o in over if not o.startswith("train.ckpt_dir")] +
                   [f"train.ckpt_dir={ck2}"])
    assert "cannot be loaded now" in line and "put that VAE back" in line and complete_steps(ck2) == [], line
    line = _sample(monkeypatch, capsys, [f"ckpt_dir={ck}", "num_samples=2", f"out={out}"])
    assert "cannot be loaded now" in line and not os.path.exists(out), line
