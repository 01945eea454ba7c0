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
    assert "cannot be loaded now" in line and "DIT_VAE_DIR=<dir>" in line and not os.path.exists(out), line
    # A set and its VAE copied to another machine: the line's way out was to put the VAE back at its old path or to
    # re-encode (hours). DIT_VAE_DIR names where it is now; a copy with the set's weights serves, others are refused.
    monkeypatch.setenv("DIT_VAE_DIR", str(tmp_path / "moved"))   # the retrained weights: not the set's VAE
    line = _sample(monkeypatch, capsys, [f"ckpt_dir={ck}", "num_samples=2", f"out={out}"])
    assert "DIT_VAE_DIR=" in line and "other weights" in line and not os.path.exists(out), line
    monkeypatch.setenv("DIT_VAE_DIR", other)   # make_tiny_vae is seeded: a copy of the VAE that encoded the set
    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt_dir={ck}", "num_samples=2", f"out={out}"])
    cli.main("sample", sample.main)
    assert os.path.exists(out)


def test_stage2_trains_and_samples_on_captioned_latents(monkeypatch, capsys, tmp_path):
    """A captioned folder encoded by a VAE feeds stage 2 (data=latents_text): text features computed once beside a
    copy of its latents, samples and the evaluation decoded through that VAE, a re-captioned source refused."""
    import json

    import numpy as np
    from PIL import Image

    import sample
    import train_stage2
    from data.captions import ensure_prepared_text
    from data.encode import prepare_latents
    from data.loader import load_split, load_text
    from data.meta import load_meta
    from data.vae import load_vae
    from training.cli import compose
    from training.errors import UserError

    vae_dir, src, root = make_tiny_vae(tmp_path / "vae"), tmp_path / "src", tmp_path / "data"
    src.mkdir()
    names = ["red square", "blue square", "green square", "white square"]
    rows = []
    for i, (name, col) in enumerate(zip(names * 2, [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)] * 2)):
        Image.new("RGB", (8, 8), col).save(src / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": name}))
    (src / "captions.jsonl").write_text("\n".join(rows) + "\n")
    prepare_latents(str(src), load_vae(vae_dir), root / "lat", resolution=8, progress=False)
    monkeypatch.setattr("data.prepare.RECORDS_PER_SHARD", 3)   # the copy is written shard by shard: 3 + 3 + 2
    ck = tmp_path / "ck"
    over = [f"data.root={root}", "data=latents_text", f"data.latents={root / 'lat'}", "data.name=lat_text",
            "data.max_tokens=8", "model=tiny_text", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
            f"train.ckpt_dir={ck}", "train.steps=4", "train.batch_size=4", "train.log_every=2", "train.ckpt_every=4",
            "train.sample_every=0", "train.progress=false", "wandb.mode=disabled", "optim.warmup_steps=1",
            "sampler.steps=4", "sampler.guidance=cfg", "eval.num_samples=8"]
    # Stage 2 pointed at the latents themselves (as stage 1 would be) says which config reads them.
    line = run_cli(monkeypatch, capsys, [o.replace("lat_text", "lat").replace("latents_text", "folder")
                                         for o in over if not o.startswith("data.latents")],
                   train_stage2.main, "stage2")
    assert "data=latents_text" in line, line
    res = train_stage2.main(compose("stage2", over))
    assert res["step"] == 4 and complete_steps(ck) == [4]
    lat, text = load_meta(root / "lat"), load_meta(root / "lat_text")
    assert text["encoder"] == lat["encoder"] and text["shape"] == lat["shape"] == [4, 4, 4]
    assert (text["shift"], text["scale"]) == (lat["shift"], lat["scale"]) and text["text"]["dim"] == 384
    assert [len(v["files"]) for v in text["splits"].values()] == [3]
    np.testing.assert_array_equal(load_split(text, root / "lat_text", "train")[0],
                                  load_split(lat, root / "lat", "train")[0])
    assert load_text(text, root / "lat_text", "train")["caption"] == names * 2
    # A copy interrupted in its second shard resumes there: the source's records of the finished shard are not
    # featurised again (nor read: tests/test_data.py's read_records(start=)), and the copy is byte for byte the
    # uninterrupted one
    from data.text import get_encoder
    enc, calls = get_encoder("minilm"), []
    encode = enc.encode

    def flaky(caps, n):
        calls.append(list(caps))
        if len(calls) == 2 and flaky.stop:
            raise KeyboardInterrupt
        return encode(caps, n)
    flaky.stop, enc.encode = True, flaky
    again = compose("stage2", [o.replace("lat_text", "lat_text2") for o in over]).data
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared_text(again, encoder=enc)
    flaky.stop = False
    calls.clear()
    ensure_prepared_text(again, encoder=enc)
    assert calls == [[names[3], names[0], names[1]], [names[2], names[3]]]   # shards 2 and 3 only
    for f in text["splits"]["train"]["files"]:
        assert (root / "lat_text2" / f).read_bytes() == (root / "lat_text" / f).read_bytes(), f
    # The end-of-run evaluation ranked the samples among the 8 training latents; its grid shows decoded 8x8 images
    ev = json.loads((ck / "eval-step0000004.json").read_text())
    assert ev["num_real"] == 8 and 0 <= ev["top1_hit_rate"] <= ev["top5_hit_rate"] <= 1
    assert (ev["chance_top5"], ev["chance_top1"]) == (5 / 8, 1 / 8)   # what luck scores, beside the rates
    shown = (ck / "samples" / "rows.txt").read_text().splitlines()   # which caption each grid row shows
    assert shown == [f"{i + 1}\t{c}" for i, c in enumerate(names * 2)], shown
    assert Image.open(ck / "eval-step0000004.png").size == (2 * (8 * 8 + 9), 2 * (2 * 8 + 3))   # 1-px gaps, x2
    out = tmp_path / "s.npz"
    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt_dir={ck}", "num_samples=2", f"out={out}",
                                      "prompt=[a red square,a blue square]"])   # a list: OmegaConf's ListConfig
    cli.main("sample", sample.main)   # (every command-line list was refused as "not a list of strings")
    assert np.load(out)["images"].shape == (2, 8, 8, 3)
    assert np.load(out)["prompts"].tolist() == ["a red square", "a blue square"]
    # The same prompts from a file (COCO-30k does not fit a command line), encoded a part at a time: the same images
    (tmp_path / "p.txt").write_text("a red square\na blue square\n")
    monkeypatch.setattr(sample, "PART_CHUNKS", 1)   # parts of one image: each part's prompt encoded when it comes
    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt_dir={ck}", "num_samples=2", f"out={tmp_path / 'f.npz'}",
                                      f"prompts_file={tmp_path / 'p.txt'}", "chunk=1"])
    cli.main("sample", sample.main)
    assert np.load(tmp_path / "f.npz")["prompts"].tolist() == ["a red square", "a blue square"]
    np.testing.assert_array_equal(np.load(tmp_path / "f.npz")["images"], np.load(out)["images"])
    (tmp_path / "p.txt").write_text("a red square\n\na blue square\n")
    line = run_cli(monkeypatch, capsys, [f"ckpt_dir={ck}", f"prompts_file={tmp_path / 'p.txt'}"], sample.main, "sample")
    assert "line 2 is blank" in line, line
    # Edited captions re-encode the latents: the featurised copy is no longer theirs, and is refused, not reused.
    cfg = compose("stage2", over)
    (src / "captions.jsonl").write_text("\n".join(rows[::-1]) + "\n")
    prepare_latents(str(src), load_vae(vae_dir), root / "lat", resolution=8, progress=False)
    with pytest.raises(UserError, match="latents_sha256"):
        ensure_prepared_text(cfg.data)
    import prepare_data
    data_over = [o for o in over if o.startswith("data")]
    prepare_data.main(compose("prepare", data_over + ["force=true"]))   # the README's way to rebuild it
    assert load_text(load_meta(root / "lat_text"), root / "lat_text", "train")["caption"] == (names * 2)[::-1]
    with pytest.raises(UserError, match="another data.name"):
        ensure_prepared_text(compose("prepare", data_over + ["data.name=lat"]).data)
    from data.prepare import prepare_arrays
    prepare_arrays(root / "pix", "pix", {"train": (np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64))}, ["a"],
                   "a pixel set")
    for bad, msg in ((root / "pix", "pixels, not VAE latents"), (tmp_path / "none", "holds no prepared latents")):
        with pytest.raises(UserError, match=msg):
            ensure_prepared_text(compose("prepare", data_over + [f"data.latents={bad}", "data.name=other"]).data)
    assert not (root / "other").exists()
