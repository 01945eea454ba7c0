"""data/vae.py and data/encode.py with a real (tiny, randomly initialised) diffusers AutoencoderKL, fully offline:
the latent convention, save_pretrained -> load, decoding for samples, resumable sharded encoding, prepare_data.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from training.errors import UserError


def make_tiny_vae(path, in_channels=3, scaling_factor=1.5305, shift_factor=0.0609):
    """A 2-block AutoencoderKL (8x8 -> 4x4x4), saved with save_pretrained; returns the directory."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    m = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                      scaling_factor=scaling_factor, shift_factor=shift_factor, mid_block_add_attention=False)
    m.save_pretrained(str(path))
    return str(path)


def write_images(d: Path, names, size=(12, 10), seed=0):
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    for n in names:
        Image.fromarray(rs.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / n)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_latent_convention_and_reload(vae_dir):
    import torch
    from diffusers import AutoencoderKL

    from data.vae import load_vae

    vae = load_vae(vae_dir)
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.downsample) == (1.5305, 0.0609, 4, 2)
    assert vae.latent_shape(8, 8) == (4, 4, 4) and vae.name == str(Path(vae_dir).resolve())
    imgs = np.random.RandomState(1).randint(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    z = vae.encode(imgs, batch_size=2)                       # batching must not change the result
    ref = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    with torch.no_grad():
        x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1
        mean = ref.encode(x).latent_dist.mean
        want = ((mean - 0.0609) * 1.5305).permute(0, 2, 3, 1).numpy()
        dec = ref.decode(mean).sample
    assert z.shape == (5, 4, 4, 4)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)
    out = vae.decode(z, chunk=2)                              # inverse map: decode(stored / scale + shift)
    want_img = np.clip(np.rint((dec.numpy().transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == imgs.shape
    assert np.abs(out.astype(int) - want_img.astype(int)).max() <= 1


def test_decode_to_uint8_inverts_the_loader_map(vae_dir):
    from data.meta import to_model
    from data.vae import decode_to_uint8, load_vae

    vae = load_vae(vae_dir)
    stored = vae.encode(np.random.RandomState(2).randint(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    meta = {"name": "t", "shift": [0.1, -0.2, 0.3, 0.0], "scale": [2.0, 0.5, 1.0, 3.0],
            "encoder": dict(vae.info())}
    np.testing.assert_array_equal(decode_to_uint8(to_model(stored, meta), meta), vae.decode(stored))
    with pytest.raises(UserError, match="encoded with"):
        decode_to_uint8(to_model(stored, meta), {**meta, "encoder": {**meta["encoder"], "scaling_factor": 0.18215}})


def test_load_errors_are_user_errors(tmp_path):
    from data.vae import PRESETS, load_vae

    assert PRESETS["sd3"]["config"]["latent_channels"] == 16 and PRESETS["sd3"]["config"]["scaling_factor"] == 1.5305
    assert PRESETS["sd3"]["config"]["shift_factor"] == 0.0609
    assert PRESETS["sdxl"]["config"]["scaling_factor"] == 0.13025
    assert PRESETS["sd"]["config"]["scaling_factor"] == 0.18215
    with pytest.raises(UserError, match="does not exist"):
        load_vae(str(tmp_path / "absent"))
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_vae(str(tmp_path / "noconfig"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):   # preset -> hub id, not cached, offline
        load_vae("sd3")
    import torch
    if not torch.cuda.is_available():   # the pinned CPU wheel: the line says which knob, and how to get a GPU build
        with pytest.raises(UserError, match=r"DIT_VAE_DEVICE=cpu, or install torch's CUDA build"):
            load_vae(str(tmp_path / "noconfig"), "cuda")


def test_a_cuda_request_under_a_cpu_torch_is_not_a_vae_to_re_encode(vae_dir, monkeypatch):
    """DIT_VAE_DEVICE=cuda under the CPU torch wheel said the set's VAE "cannot be loaded now: put that VAE back, or
    re-encode the set": hours of encoding for a setting of this host. The line names the setting."""
    import torch

    from data.vae import load_vae, vae_for_meta

    if torch.cuda.is_available():
        pytest.skip("a CUDA torch: the request is served")
    meta = {"name": "lat", "encoder": load_vae(vae_dir).info()}
    monkeypatch.setenv("DIT_VAE_DEVICE", "cuda")
    with pytest.raises(UserError, match=r"VAE device 'cuda' requested .* use DIT_VAE_DEVICE=cpu") as e:
        vae_for_meta(meta)
    assert "re-encode" not in str(e.value)


def test_dit_vae_dir_needs_a_recorded_fingerprint(vae_dir, monkeypatch):
    """DIT_VAE_DIR (a moved VAE) is checked against the weights the set recorded; a set that recorded none (a hub id,
    an older set) cannot be checked, and says so instead of decoding through whatever the directory holds."""
    from data.vae import load_vae, vae_for_meta

    info = load_vae(vae_dir).info()
    monkeypatch.setenv("DIT_VAE_DIR", vae_dir)
    assert vae_for_meta({"name": "lat", "encoder": {**info, "vae": "/gone/vae"}}).name == load_vae(vae_dir).name
    monkeypatch.setenv("DIT_VAE_DIR", "/exported/for/another/set")   # this set's VAE is where it was: not needed
    assert vae_for_meta({"name": "lat", "encoder": info}).name == load_vae(vae_dir).name
    monkeypatch.setenv("DIT_VAE_DIR", vae_dir)
    del info["weights_fingerprint"]
    with pytest.raises(UserError, match="records no fingerprint .* unset DIT_VAE_DIR"):
        vae_for_meta({"name": "lat", "encoder": {**info, "vae": "/gone/vae"}})


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    """Without HF_HUB_OFFLINE, on a machine whose DNS cannot resolve the hub, a hub id fails in one line at once
    (only the local cache is tried) instead of after the hub client's five retries and their warnings."""
    import socket
    import time

    from data.vae import load_vae

    def no_dns(host, *a, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"the hub \(huggingface.co\) cannot be reached from here"):
        load_vae("someone/no-such-vae")
    assert time.monotonic() - t0 < 5


def _shards(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.array_record"))}


def test_interrupted_prepare_resumes_to_identical_shards(vae_dir, tmp_path):
    from data.encode import prepare_latents
    from data.loader import load_split, make_iterator
    from data.vae import load_vae

    for c in ("a", "b"):
        write_images(tmp_path / "src" / c, [f"{c}{i}.png" for i in range(5)], seed=ord(c))
    vae = load_vae(vae_dir)
    kw = dict(resolution=8, shard_size=3, batch_size=2, hflip=True, progress=False)
    full = prepare_latents(str(tmp_path / "src"), vae, tmp_path / "full", **kw)

    calls = []

    def interrupt(name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(str(tmp_path / "src"), vae, tmp_path / "part", on_shard=interrupt, **kw)
    assert not (tmp_path / "part" / "meta.json").exists() and len(_shards(tmp_path / "part")) == 2
    written = []
    resumed = prepare_latents(str(tmp_path / "src"), vae, tmp_path / "part", on_shard=written.append, **kw)
    assert len(written) == 2 and not set(written) & set(calls)          # restarted at the first unfinished shard
    assert _shards(tmp_path / "part") == _shards(tmp_path / "full")      # bitwise
    assert len(_shards(tmp_path / "full")) == 4
    assert {k: v for k, v in resumed.items() if k != "name"} == {k: v for k, v in full.items() if k != "name"}
    assert full["shape"] == [4, 4, 4] and full["dtype"] == "float16" and full["splits"]["train"]["num_records"] == 20
    assert full["encoder"]["scaling_factor"] == 1.5305 and full["encoder"]["vae"] == str(Path(vae_dir).resolve())
    x, y = load_split(full, tmp_path / "full", "train")
    np.testing.assert_allclose(full["channel_mean"], x.astype(np.float64).mean((0, 1, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full["channel_std"], x.astype(np.float64).std((0, 1, 2)), rtol=1e-6)
    b = next(make_iterator(full, tmp_path / "full", "train", batch_size=4, seed=0))
    assert b["x"].shape == (4, 4, 4, 4) and b["x"].dtype == np.float32
    # force=true encodes every shard again, to the same bytes, even though the set matched.
    again = []
    prepare_latents(str(tmp_path / "src"), vae, tmp_path / "full", on_shard=again.append, force=True, **kw)
    assert len(again) == 4 and _shards(tmp_path / "full") == _shards(tmp_path / "part")
    with pytest.raises(UserError, match="1x1 latents .* pass resolution=4 or more"):   # nothing a patch can split
        prepare_latents(str(tmp_path / "src"), vae, tmp_path / "small", **{**kw, "resolution": 2})
    assert not (tmp_path / "small").exists()
    # A different setting (no flip) over a complete set: refused, naming it (it silently deleted the set before the
    # new encode had started); with force=true it is a new plan that starts over instead of reusing shards.
    before = _shards(tmp_path / "part")
    with pytest.raises(UserError, match=r"already holds a prepared data set made from something else \(hflip "
                                        r"differ\).*force=true"):
        prepare_latents(str(tmp_path / "src"), vae, tmp_path / "part", **{**kw, "hflip": False})
    assert _shards(tmp_path / "part") == before and (tmp_path / "part" / "meta.json").exists()
    meta = prepare_latents(str(tmp_path / "src"), vae, tmp_path / "part", force=True, **{**kw, "hflip": False})
    assert meta["splits"]["train"]["num_records"] == 10
    # An interrupted encode with other settings is refused too (a smaller batch_size after running out of memory
    # threw every finished shard away without a word)
    def interrupt2(name):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(str(tmp_path / "src"), vae, tmp_path / "int", on_shard=interrupt2, **kw)
    with pytest.raises(UserError, match=r"interrupted encode with other settings \(batch_size differ\)"):
        prepare_latents(str(tmp_path / "src"), vae, tmp_path / "int", **{**kw, "batch_size": 1})
    assert len(_shards(tmp_path / "int")) == 1


def test_a_changed_source_keeps_the_complete_set_until_its_replacement_is(vae_dir, tmp_path, capsys):
    """Re-encoding after the source changed (an edited image) deleted the complete set first: stopped after one
    shard, the user was left with one shard and no meta.json. Now the old set waits aside, as with force=true, and
    is back whole when the new encode is stopped."""
    from data.encode import prepare_latents
    from data.vae import load_vae

    vae = load_vae(vae_dir)
    encode = lambda **kw: prepare_latents(str(tmp_path / "s"), vae, tmp_path / "o", resolution=8, shard_size=2,
                                          progress=False, **kw)
    write_images(tmp_path / "s" / "a", [f"{i}.png" for i in range(6)])
    meta = encode()
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    original = (tmp_path / "s" / "a" / "0.png").read_bytes()
    write_images(tmp_path / "s" / "a", ["0.png"], seed=1)   # other pixels

    def stop(name):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        encode(on_shard=stop)
    assert "old copy is back in place" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    (tmp_path / "s" / "a" / "0.png").write_bytes(original)   # put back: other times, the encoded bytes
    assert encode() == meta    # then it completes: the same latents
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.array_record")} == \
        {k: v for k, v in before.items() if k.endswith(".array_record")}
    assert not list(tmp_path.glob(".o.replaced-*"))


def test_a_copied_or_touched_source_keeps_its_shards(vae_dir, tmp_path, capsys, monkeypatch):
    """A `touch`, a `cp -r` (new times) or a copy of the source elsewhere re-encoded every image ("changed since") or
    was refused ("source differ"): an ImageNet encode is hours of GPU. Each finished shard now records its files'
    bytes; a source whose files hold them (and the same names, labels, captions and settings) keeps the shards, and
    an interrupted encode resumes on the copy. Other bytes are still encoded again."""
    import shutil

    from data.encode import STATE_FILE, prepare_latents
    from data.vae import load_vae

    vae = load_vae(vae_dir)
    encode = lambda src, out, **kw: prepare_latents(str(src), vae, tmp_path / out, resolution=8, shard_size=2,
                                                    progress=False, **kw)
    src = tmp_path / "s"
    write_images(src / "a", [f"{i}.png" for i in range(3)])
    write_images(src / "b", [f"{i}.png" for i in range(3)], seed=2)
    import builtins
    reads, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (str(f).endswith(".png") and reads.append(str(f)))
                        or real_open(f, *a, **k))
    meta = encode(src, "o")
    monkeypatch.setattr(builtins, "open", real_open)
    assert sorted(reads) == sorted(map(str, src.rglob("*.png"))), reads   # each image read once: decoded and hashed
    shards = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "o").glob("*.array_record")}
    for f in src.rglob("*.png"):   # touched: other times, the same bytes
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert encode(src, "o") == meta
    out = capsys.readouterr().out
    assert "comparing their bytes" in out and "keeps its shards" in out
    assert encode(src, "o") == meta and "comparing" not in capsys.readouterr().out   # recorded: the stat pass again
    copy = tmp_path / "scratch" / "s"   # elsewhere, with `cp -r`'s new times; the original still there
    shutil.copytree(src, copy, copy_function=shutil.copyfile)
    assert encode(copy, "o") == meta
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "o").glob("*.array_record")} == shards
    # interrupted after its first shard, resumed on a copy: only the other shards are encoded, to the same bytes
    names = []

    def stop(name):
        names.append(name)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        encode(src, "o2", on_shard=stop)
    copy2 = tmp_path / "scratch2"
    shutil.copytree(src, copy2, copy_function=shutil.copyfile)
    encode(copy2, "o2", on_shard=names.append)
    assert len(names) == len(shards) and len(set(names)) == len(names)   # the first shard was not encoded again
    assert {p.name: p.read_bytes() for p in (tmp_path / "o2").glob("*.array_record")} == \
        {k: v[0] for k, v in shards.items()}
    # other bytes: encoded again, as an edited source was
    write_images(copy / "a", ["1.png"], seed=5)
    encode(copy, "o")
    assert "changed since" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / STATE_FILE).read_text())["plan"]["source"] == str(copy.resolve())
    # a file the encode skipped as unreadable (gone since listed, EIO) leaves its shard without a record, not a
    # FileNotFoundError after the shard was written, at every rerun
    from data.encode_plan import Items, shard_bytes, shard_digest
    from data.folders import load_hashed
    gone = Items(1, None, [0], ["gone.png:1:1"], paths=[str(tmp_path / "gone.png")], names=["gone.png"])
    with pytest.warns(UserWarning, match="skipping .*gone.png"):
        got = load_hashed(tmp_path / "gone.png", 8, 3)
    assert got == (None, None) and shard_digest(gone, [0], [got[1]]) is None and shard_bytes(gone, [0]) is None


def test_prepare_data_cli_offline(vae_dir, tmp_path):
    write_images(tmp_path / "src" / "cat", ["1.png", "2.jpg"])
    write_images(tmp_path / "src" / "dog", ["3.png"])
    out = tmp_path / "lat"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "prepare_data.py", f"source={tmp_path / 'src'}", f"vae={vae_dir}",
                        "resolution=8", f"out={out}", "progress=false"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "images/s" in p.stdout and f"data.name={out.name}" in p.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["class_names"] == ["cat", "dog"] and meta["splits"]["train"]["num_records"] == 3
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    # A mistyped VAE with force=true: refused before anything of the encoded set is removed.
    p = subprocess.run([sys.executable, "prepare_data.py", f"source={tmp_path / 'src'}", f"vae={tmp_path / 'nope'}",
                        "resolution=8", f"out={out}", "force=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], p.stderr[-2000:]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_generate_decodes_latent_samples(vae_dir):
    """training/generate.py: a model trained on latents yields decoded uint8 images of the VAE's image size."""
    import jax
    from omegaconf import OmegaConf

    from data.vae import load_vae
    from models import build_model
    from training.generate import generate

    vae = load_vae(vae_dir)
    meta = {"name": "lat", "shape": [4, 4, 4], "dtype": "float16", "num_classes": 3, "shift": [0.0] * 4,
            "scale": [1.0] * 4, "encoder": vae.info()}
    spec = {"hidden_size": 16, "depth": 1, "num_heads": 2, "patch_size": 2, "mlp_ratio": 2.0, "input_size": [4, 4],
            "in_channels": 4, "num_classes": 3}
    model = build_model(spec, key=jax.random.PRNGKey(0))
    sampler = OmegaConf.create({"solver": "euler", "steps": 2, "cfg_scale": 1.0, "chunk": 2, "rtol": 1e-3,
                                "atol": 1e-3})
    train = OmegaConf.create({"prediction": "v", "t_eps": 0.05, "precision": "float32"})
    imgs = generate(model, spec, meta, np.array([0, 1, 2], np.int32), jax.random.PRNGKey(1), sampler, train)
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 8, 8, 3)


def test_train_autoencoder_saves_a_loadable_calibrated_vae(tmp_path):
    """train_autoencoder.py (a few steps on digits): save_pretrained output loads offline with its calibration."""
    import json as _json

    import train_autoencoder
    from data.vae import load_vae
    from training.cli import compose

    out = tmp_path / "ae"
    cfg = compose("autoencoder", ["data=digits", "steps=3", "batch_size=16", "block_out_channels=[16,32]",
                                  f"out={out}", "log_every=1", f"data.root={tmp_path / 'prepared'}"])
    import signal
    before = signal.getsignal(signal.SIGINT)
    report = train_autoencoder.main(cfg)
    assert signal.getsignal(signal.SIGINT) is before   # its early-stop handler is put back: Ctrl-C works after it
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert _json.loads((out / "train_report.json").read_text())["test_psnr_db"] == report["test_psnr_db"]
    assert report["steps"] == 3 and report["latent_shape"] == [4, 4, 4] and 0 < report["test_psnr_db"] < 60
    scored = report["classifier"]    # the stage-1 metric on train images as they are and after a 3-step autoencoder
    assert scored["train_images"]["fd_ratio"] < 3 < scored["reconstructed"]["fd_ratio"]
    vae = load_vae(str(out))
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"])
    assert vae.shift_factor == pytest.approx(report["shift_factor"])
    from data.builtin import load_builtin
    z = vae.encode(load_builtin("digits")["train"][0][:500])       # calibrated: stored latents ~ zero mean, unit std
    assert abs(z.mean()) < 0.2 and 0.7 < z.std() < 1.3


def test_train_autoencoder_refuses_an_unwritable_out_before_training(tmp_path):
    import train_autoencoder
    from training.cli import compose

    (tmp_path / "afile").write_text("")
    for bad in (["out=" + str(tmp_path / "afile" / "ae")], ["steps=0", f"out={tmp_path / 'ae'}"]):
        cfg = compose("autoencoder", ["data=digits", *bad, f"data.root={tmp_path / 'prepared'}"])
        with pytest.raises(UserError, match="cannot write|steps=0"):
            train_autoencoder.main(cfg)
