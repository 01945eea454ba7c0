"""The latent encode's resume state at scale: each shard's captions in a file of its own, not in the state."""

import json
import os

import pytest

from test_folders import _prep
from training.runlock import exclusive
from test_vae import write_images


def _captioned(folder, n):
    write_images(folder, [f"{i}.png" for i in range(n)])
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "caption": f"pic \u2028 {i}"}) + "\n"
                                                   for i in range(n)))


def test_captions_live_beside_the_state_not_in_it(vae, tmp_path):
    """The state held every finished shard's captions and was rewritten whole after each shard: 1.28M captioned
    images made a 212 MB state and ~10 minutes of rewrites. Now the state holds counts; the captions file is the same
    bytes, an encode interrupted under the old state resumes, and a lost captions file re-encodes its shard alone."""
    from data.encode import CAPTIONS_DIR, STATE_FILE

    _captioned(tmp_path / "s", 7)
    _prep(tmp_path / "s", vae, tmp_path / "full", shard_size=3)
    caps = (tmp_path / "full" / "captions-train.jsonl").read_bytes()
    rows = [json.loads(line) for line in caps.decode().split("\n") if line]   # one line per record, in order
    assert [r["caption"] for r in rows] == [f"pic \u2028 {i}" for i in range(7)]
    assert [r["file"].split(":")[0] for r in rows] == [f"{i}.png" for i in range(7)]
    state = json.loads((tmp_path / "full" / STATE_FILE).read_text())
    assert len(state["shards"]) == 3 and not any("captions" in info for info in state["shards"].values())
    assert len(list((tmp_path / "full" / CAPTIONS_DIR).iterdir())) == 3

    # interrupted after one shard, its captions moved into the state as the code before this wrote it: resumed
    def stop(name):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=stop)
    state = json.loads((tmp_path / "o" / STATE_FILE).read_text())
    (name, info), = state["shards"].items()
    side = tmp_path / "o" / CAPTIONS_DIR / info.pop("captions_file")
    info["captions"] = [json.loads(line) for line in side.read_text().split("\n") if line]
    side.unlink()
    (tmp_path / "o" / STATE_FILE).write_text(json.dumps(state))
    written = []
    _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=written.append)
    assert len(written) == 2 and name not in written
    assert (tmp_path / "o" / "captions-train.jsonl").read_bytes() == caps

    # a finished shard whose captions file went: that shard alone is encoded again
    lost = sorted((tmp_path / "full" / CAPTIONS_DIR).iterdir())[1]
    lost.unlink()
    written = []
    _prep(tmp_path / "s", vae, tmp_path / "full", shard_size=3, on_shard=written.append)
    assert written == [lost.name[:-len(".jsonl")]] and lost.is_file()
    assert (tmp_path / "full" / "captions-train.jsonl").read_bytes() == caps


def test_a_copied_vae_is_the_same_vae(tmp_path, capsys):
    """The VAE's identity in the encode's plan holds its path and its files' times: an encode resumed with the VAE
    copied to a node's scratch disk (or touched) was refused as "another plan", and the way out re-encoded every
    shard. The same config and weights (weights_fingerprint) now make the same VAE; other weights are refused."""
    import os
    import shutil

    from data.encode import prepare_latents
    from data.vae import load_vae
    from test_vae import make_tiny_vae

    src = tmp_path / "s"
    write_images(src / "a", [f"{i}.png" for i in range(3)])
    write_images(src / "b", [f"{i}.png" for i in range(3)], seed=2)
    vae_dir = make_tiny_vae(tmp_path / "vae")
    encode = lambda vae, out, **kw: prepare_latents(str(src), load_vae(vae), tmp_path / out, resolution=8,
                                                    shard_size=2, progress=False, **kw)
    names = []

    def stop(name):
        names.append(name)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):   # interrupted after its first shard
        encode(vae_dir, "o", on_shard=stop)
    copy = tmp_path / "scratch" / "vae"
    shutil.copytree(vae_dir, copy, copy_function=shutil.copyfile)   # new path, new times
    capsys.readouterr()
    meta = encode(str(copy), "o", on_shard=names.append)
    assert "the same VAE" in capsys.readouterr().out
    assert len(names) == 3 and len(set(names)) == 3, names   # 3 shards: the first was not encoded again
    # the set names the VAE it was begun with (a run's data identity holds that name): DIT_VAE_DIR points at copies
    assert meta["encoder"]["vae"] == load_vae(vae_dir).name != load_vae(str(copy)).name
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.array_record")}
    state_file = tmp_path / "o" / ".prepare-state.json"   # as a state from before the weights were kept in it:
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items()  # meta.json's
                                      if k != "vae_weights"}))                                     # record serves
    for f in copy.iterdir():   # touched as well: still the same VAE, and the complete set is kept as it is
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    load_vae.cache_clear()
    assert encode(str(copy), "o") == meta
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.array_record")} == shards
    # other weights under the same config: another VAE, refused as before
    import torch
    from diffusers import AutoencoderKL
    m = AutoencoderKL.from_pretrained(str(copy))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    m.save_pretrained(str(copy))
    load_vae.cache_clear()
    from training.errors import UserError
    with pytest.raises(UserError, match="made from something else .*vae"):
        encode(str(copy), "o")


def test_an_encode_stopped_before_its_first_shard_keeps_nothing_to_refuse(tmp_path, vae):
    """An encode stopped before it finished a shard (Ctrl-C while the VAE loaded its first batch), rerun on a copy of
    the source or with a corrected setting, was refused as "an interrupted encode with other settings": nothing was
    there to keep, and the way out was force=true. It now begins anew."""
    import shutil

    from data.encode import prepare_latents

    src = tmp_path / "s"
    write_images(src / "a", [f"{i}.png" for i in range(3)])
    write_images(src / "b", [f"{i}.png" for i in range(3)], seed=2)
    real = vae.encode

    def stop(*a, **k):
        raise KeyboardInterrupt
    shutil.copytree(src, tmp_path / "copy")
    for out, (source, res) in enumerate(((tmp_path / "copy", 8), (src, 16))):   # another source; another setting
        vae.encode = stop
        try:
            with pytest.raises(KeyboardInterrupt):
                prepare_latents(str(src), vae, tmp_path / f"o{out}", resolution=8, shard_size=2, progress=False)
        finally:
            vae.encode = real
        assert json.loads((tmp_path / f"o{out}" / ".prepare-state.json").read_text())["shards"] == {}
        meta = prepare_latents(str(source), vae, tmp_path / f"o{out}", resolution=res, shard_size=2, progress=False)
        assert meta["splits"]["train"]["num_records"] == 6 and meta["encoder"]["resolution"] == res


def test_two_encodes_into_one_folder_take_turns(tmp_path, vae, capsys):
    """Two encodes into one out= (a command pasted into two terminals, a job submitted twice) ran at once: each
    removed the other's scratch folder as an interruption's leftover and overwrote the other's resume state. The
    second now waits for the set's preparing lock, then finds the set complete."""
    import threading

    from data.encode import prepare_latents
    from data.rebuild import preparing_lock

    src = tmp_path / "s"
    write_images(src / "a", [f"{i}.png" for i in range(2)])
    write_images(src / "b", [f"{i}.png" for i in range(2)], seed=2)
    out = tmp_path / "o"
    with exclusive(preparing_lock(out), "unused"):   # this thread holds it as another process would, until the end
        got = []
        second = threading.Thread(target=lambda: got.append(prepare_latents(str(src), vae, out, resolution=8,
                                                                            progress=False)))
        second.start()
        second.join(timeout=3)
        assert second.is_alive() and not (out / ".prepare-state.json").exists()   # waiting, nothing touched
        assert "waiting for another process encoding into" in capsys.readouterr().out
    second.join(timeout=60)
    assert got and got[0]["splits"]["train"]["num_records"] == 4


def test_a_rebuild_killed_outright_resumes_and_a_second_one_keeps_the_fresh_set(tmp_path, vae, monkeypatch, capsys):
    """`prepare_data.py source=... vae=... force=true` killed outright (kill -9, a preemption) leaves the old set
    aside and the new one's finished shards in place. The same command again put the old copy back and started
    from nothing (hours of encoding at ImageNet size); it now resumes the new shards. A second force=true that
    waited for the first one (a job submitted twice) saw the set moved aside, took it for absent and encoded it all
    again in place, the set without meta.json meanwhile; it now keeps the set completed while it waited."""
    import shutil
    import sys
    import threading

    import prepare_data
    from data.encode import prepare_latents
    from data.rebuild import preparing_lock
    from training import cli

    src = tmp_path / "s"
    write_images(src / "a", [f"{i}.png" for i in range(3)])
    write_images(src / "b", [f"{i}.png" for i in range(3)], seed=2)
    kw = dict(resolution=8, shard_size=2, progress=False)
    prepare_latents(str(src), vae, tmp_path / "full", **kw)   # what the rebuild makes, uninterrupted
    shards = lambda d: {p.name: p.read_bytes() for p in d.glob("*.array_record")}
    out = tmp_path / "o"
    shutil.copytree(tmp_path / "full", tmp_path / ".o.replaced-4194304")   # the old set, aside (its process is gone)
    names = []

    def stop(name):
        names.append(name)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):   # the killed rebuild had finished one shard of the new set
        prepare_latents(str(src), vae, out, on_shard=stop, **kw)
    first = (out / names[0]).stat().st_mtime_ns
    argv = ["prepare_data.py", f"source={src}", f"vae={vae.name}", "resolution=8", f"out={out}", "shard_size=2",
            "progress=false", "force=true"]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    cli.main("prepare", prepare_data.main)
    said = capsys.readouterr().out
    assert "resuming the stopped rebuild" in said and "resuming: 1 of 3 shards" in said, said
    assert (out / names[0]).stat().st_mtime_ns == first and shards(out) == shards(tmp_path / "full")
    assert not list(tmp_path.glob(".o.replaced-*")) and (out / "meta.json").is_file()
    # Ctrl-C (or a preemption's signal taken as one) stops a rebuild as a kill does: resumable by the same command
    from data.vae import Vae
    real, calls = Vae.encode, []

    def ctrl_c_at_the_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(Vae, "encode", ctrl_c_at_the_second_batch)
    with pytest.raises(SystemExit):
        cli.main("prepare", prepare_data.main)
    assert "the same command resumes it" in capsys.readouterr().err
    assert len(list(tmp_path.glob(".o.replaced-*"))) == 1 and not (out / "meta.json").exists()
    monkeypatch.setattr(Vae, "encode", real)
    cli.main("prepare", prepare_data.main)
    said = capsys.readouterr().out
    assert "resuming the stopped rebuild" in said and "resuming: 1 of 3 shards" in said, said
    assert shards(out) == shards(tmp_path / "full") and not list(tmp_path.glob(".o.replaced-*"))
    first = (out / names[0]).stat().st_mtime_ns

    # the same command twice: the second waits for the first, which completes the set meanwhile (new shard files,
    # then meta.json); a process that only rewrote meta.json meanwhile (a check recording where a captioned set's
    # images are now) rebuilt nothing, and the waiting force=true rebuilds
    def renew(f):
        (f.parent / f".{f.name}.new").write_bytes(f.read_bytes())
        os.replace(f.parent / f".{f.name}.new", f)
    for completes in (True, False):
        with exclusive(preparing_lock(out), "unused"):
            second = threading.Thread(target=cli.main, args=("prepare", prepare_data.main))
            second.start()
            second.join(timeout=2)
            assert second.is_alive()
            for f in [*out.glob("*.array_record"), out / "meta.json"] if completes else [out / "meta.json"]:
                renew(f)
            first = (out / names[0]).stat().st_mtime_ns
        second.join(timeout=60)
        said = capsys.readouterr().out
        assert ("rebuilt by another process while this one waited" in said) == completes, said
        assert ("rebuilding" in said) != completes, said
        assert shards(out) == shards(tmp_path / "full") and ((out / names[0]).stat().st_mtime_ns == first) == completes
    # a run reading the set: force=true is refused at once, before the VAE loads (a minute for an SD-sized one)
    from data.rebuild import reading
    monkeypatch.setattr("data.vae.load_vae", lambda *a: pytest.fail("the VAE was loaded before the refusal"))
    with reading(out), pytest.raises(SystemExit) as exc:
        cli.main("prepare", prepare_data.main)
    assert exc.value.code == 2 and "is being read by a run" in capsys.readouterr().err
