"""Captioned folders for stage 2 (data=folder): prepared a batch at a time, refused when made from something else,
reused when copied or touched (their bytes decide), resumed when interrupted."""

import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.captions import ensure_prepared_text, read_folder
from data.loader import load_text, make_iterator
from data.meta import load_meta, write_meta
from training.errors import UserError


def test_captioned_folder_prepared_and_loaded(tmp_path, minilm):
    from PIL import Image
    rows = []
    for i, (col, name) in enumerate([((255, 0, 0), "red square"), ((0, 0, 255), "blue square")] * 2):
        Image.new("RGB", (8, 8), col).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": name}))
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    dc = OmegaConf.create({"name": "sq", "kind": "folder", "folder": str(tmp_path), "captions_file":
                           str(tmp_path / "c.jsonl"), "size": 8, "root": str(tmp_path / "prep"),
                           "text_encoder": "minilm", "max_tokens": 6, "limit": None})
    meta, d = ensure_prepared_text(dc, encoder=minilm)
    assert meta["text"]["dim"] == 384 and meta["text"]["max_tokens"] == 6
    batch = next(make_iterator(meta, d, "train", batch_size=4, seed=0, shuffle=False))
    # caption states as stored, float16 (half the loader's and the device copy's bytes; the step widens them)
    assert batch["text"].shape == (4, 6, 384) and batch["text"].dtype == np.float16 and batch["mask"].dtype == bool
    t = load_text(meta, d, "train")
    assert t["caption"] == ["red square", "blue square"] * 2
    np.testing.assert_array_equal(batch["mask"], t["mask"])
    np.testing.assert_allclose(batch["text"], t["text"])
    assert batch["x"][0, 0, 0, 0] == 1.0 and batch["x"][1, 0, 0, 2] == 1.0   # model space [-1, 1]
    # the same data.name asked for another folder, an edited captions file or another token count is refused, not
    # silently reused (the folder config keeps one name for every folder); the same request is reused as it is
    assert ensure_prepared_text(dc, encoder=minilm)[0] == meta
    other = tmp_path / "other"
    other.mkdir()
    for change in ({"max_tokens": 8}, {"folder": str(other)}):
        with pytest.raises(UserError, match="prepared from something else") as e:
            ensure_prepared_text(OmegaConf.merge(dc, change), encoder=minilm)
        assert str(next(iter(change))) in str(e.value)
    # Sources moved (prepared/ copied elsewhere, files renamed) or deleted: the prepared set is still this request's
    # (a resume was refused for a moved captions file with the same bytes)
    import shutil
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved", ignore=shutil.ignore_patterns("prep"))
    moved = OmegaConf.merge(dc, {"folder": str(tmp_path.parent / f"{tmp_path.name}-moved"),
                                 "captions_file": str(tmp_path / "c2.jsonl")})
    shutil.copy(tmp_path / "c.jsonl", tmp_path / "c2.jsonl")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path.parent / f"{tmp_path.name}-moved" / "3.png")
    with pytest.raises(UserError, match="folder"):   # the recorded folder is still there: another folder of images
        ensure_prepared_text(moved, encoder=minilm)
    os.rename(tmp_path / "c.jsonl", tmp_path / "c.keep")
    assert ensure_prepared_text(OmegaConf.merge(dc, {"captions_file": str(tmp_path / "c2.jsonl")}),
                                encoder=None)[0] == meta          # same bytes at another path: reused as it is
    assert ensure_prepared_text(dc, encoder=None)[0] == meta      # captions file gone: the prepared copy is used
    os.rename(tmp_path / "c.keep", tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text("\n".join(rows[:2]))
    with pytest.raises(UserError, match="captions_sha256"):   # edited captions: not the set that was prepared
        ensure_prepared_text(dc, encoder=minilm)
    assert (d / "meta.json").is_file()   # nothing the user had is removed
    # Edited images under unchanged captions were trained on as the stale pixels prepared before, without a word.
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    assert ensure_prepared_text(dc, encoder=None)[0] == meta
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "0.png")
    st = os.stat(tmp_path / "0.png")
    os.utime(tmp_path / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a coarse clock may not have moved
    with pytest.raises(UserError, match="images_sha256"):
        ensure_prepared_text(dc, encoder=minilm)
    assert (d / "meta.json").is_file()


def test_a_copied_or_touched_folder_is_the_same_set(tmp_path, minilm, capsys):
    """The images' stamps (size, mtime) change under `cp -r` and `touch`: a resume after copying the folder to scratch
    disk was refused ("prepared from something else"), and the way out recomputed every caption's features. The bytes
    now decide, read only when the stamps disagree; meta.json then records the images where they are, so the next
    start is the cheap stat pass again. Edited bytes are still refused."""
    import shutil

    from PIL import Image

    src, rows = tmp_path / "a", []
    src.mkdir()
    for i, col in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (8, 8), col).save(src / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"square {i}"}))
    (src / "c.jsonl").write_text("\n".join(rows))
    dc = OmegaConf.create({"name": "sq", "kind": "folder", "folder": str(src), "captions_file": str(src / "c.jsonl"),
                           "size": 8, "root": str(tmp_path / "prep"), "text_encoder": "minilm", "max_tokens": 6,
                           "limit": None})
    meta, d = ensure_prepared_text(dc, encoder=minilm)
    shards = {f: (d / f).stat().st_mtime_ns for f in meta["splits"]["train"]["files"]}
    capsys.readouterr()
    for f in src.glob("*.png"):   # touched: other times, the same bytes
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = ensure_prepared_text(dc, encoder=None)[0]
    assert "comparing their bytes" in capsys.readouterr().out
    assert {**again, "text": {}} == {**meta, "text": {}} and again["text"]["request"]["images_sha256"] != \
        meta["text"]["request"]["images_sha256"] and load_meta(d) == again
    assert ensure_prepared_text(dc, encoder=None)[0] == again and "bytes" not in capsys.readouterr().out
    for f in src.glob("*.png"):   # back to the times it was prepared with (another host's copy, say): compared before
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert ensure_prepared_text(dc, encoder=None)[0] == again and "comparing" not in capsys.readouterr().out
    # copied to another disk with `cp -r` (new times), the original still there: the same set, recorded there now
    copy = tmp_path / "scratch"
    shutil.copytree(src, copy, copy_function=shutil.copyfile)
    on_copy = OmegaConf.merge(dc, {"folder": str(copy), "captions_file": str(copy / "c.jsonl")})
    assert ensure_prepared_text(on_copy, encoder=None)[0]["text"]["request"]["folder"] == str(copy.resolve())
    assert {f: (d / f).stat().st_mtime_ns for f in shards} == shards   # not prepared again
    # another process records (or rebuilds) the set while this one compares bytes: judged again against that
    import data.text_reuse as text_reuse
    compare = text_reuse.images_bytes_sha256

    def meanwhile(*args):
        other = load_meta(d)
        other["text"]["request"].update(folder=str(copy.resolve()), images_sha256="recorded by another process")
        write_meta(d, other)
        return compare(*args)
    for f in copy.glob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    text_reuse.images_bytes_sha256 = meanwhile
    try:
        got = ensure_prepared_text(on_copy, encoder=None)[0]
    finally:
        text_reuse.images_bytes_sha256 = compare
    assert got == load_meta(d) and got["text"]["request"]["images_sha256"] != "recorded by another process"
    # other bytes in the copy: refused, as edited images were, and the set stays as it was
    Image.new("RGB", (8, 8), (1, 2, 3)).save(copy / "1.png")
    with pytest.raises(UserError, match="images_sha256"):
        ensure_prepared_text(on_copy, encoder=minilm)
    assert {f: (d / f).stat().st_mtime_ns for f in shards} == shards and load_meta(d)["splits"] == meta["splits"]


def test_captioned_folder_is_streamed_a_batch_at_a_time(tmp_path, minilm, monkeypatch):
    """A captioned folder was read whole into memory, with every caption's features at once: at ImageNet size that
    does not fit. Now records are made and written a batch at a time, within shards, and are the same records."""
    from PIL import Image

    import data.text_shards as text_shards

    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"picture number {i}"}))
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    monkeypatch.setattr(text_shards, "SHARD_BYTES", 3 * 8 * 8 * 3)   # 3 images of 8x8 RGB per shard
    monkeypatch.setattr(text_shards, "FEATURE_BATCH", 2)
    seen = []
    encode = minilm.encode
    monkeypatch.setattr(minilm, "encode", lambda caps, n: seen.append(list(caps)) or encode(caps, n))
    dc = OmegaConf.create({"name": "st", "kind": "folder", "folder": str(tmp_path), "captions_file":
                           str(tmp_path / "c.jsonl"), "size": 8, "root": str(tmp_path / "prep"),
                           "text_encoder": "minilm", "max_tokens": 6, "limit": None})
    meta, d = ensure_prepared_text(dc, encoder=minilm)
    assert [len(c) for c in seen] == [2, 1, 2, 2] and len(meta["splits"]["train"]["files"]) == 3   # shards 3, 2, 2
    x, caps = read_folder(tmp_path, tmp_path / "c.jsonl", 8)   # the in-memory reader: the same pixels and captions
    batch = next(make_iterator(meta, d, "train", batch_size=7, seed=0, shuffle=False))
    np.testing.assert_array_equal(np.rint((batch["x"] + 1) * 127.5), x)
    assert load_text(meta, d, "train")["caption"] == caps
    np.testing.assert_allclose(meta["channel_mean"], x.reshape(-1, 3).mean(0))
    np.testing.assert_allclose(meta["channel_std"], x.reshape(-1, 3).std(0))
    states, _ = encode(caps, 6)
    np.testing.assert_allclose(batch["text"], states.astype(np.float16), rtol=2e-3, atol=1e-3)
    # every line is checked before an image is read: a bad last line is reported, not the missing first image
    (tmp_path / "c.jsonl").write_text("\n".join([json.dumps({"file": "gone.png", "caption": "x"}), *rows, "{oops"]))
    with pytest.raises(UserError, match="line 9 is not a JSON object"):
        ensure_prepared_text(OmegaConf.merge(dc, {"name": "st2"}), encoder=minilm)
    # so is text a record cannot hold: a lone surrogate (a JSON escape like \ud800) reached the tokenizer, a 70 KB
    # caption the record writer, each after the work before it, with a traceback or no line named
    for bad, why in (('"\\ud800 face"', "lone surrogate"), (json.dumps("x" * 70_000), "70000 bytes")):
        (tmp_path / "c.jsonl").write_text("\n".join([*rows, '{"file": "0.png", "caption": %s}' % bad]))
        with pytest.raises(UserError, match=f"line 8: the caption .*{why}"):
            ensure_prepared_text(OmegaConf.merge(dc, {"name": "st2"}), encoder=minilm)
        assert not (tmp_path / "prep" / "st2").exists()
    # an image that cannot be read half-way through: one line naming it, and no partial shard left behind
    (tmp_path / "c.jsonl").write_text("\n".join([*rows[:4], json.dumps({"file": "gone.png", "caption": "x"})]))
    with pytest.raises(UserError, match=r"line 5: cannot read image .*gone\.png"):
        ensure_prepared_text(OmegaConf.merge(dc, {"name": "st3"}), encoder=minilm)
    left = sorted(p.name for p in (tmp_path / "prep" / "st3").iterdir())   # the first shard done (and said so); no
    assert left == [".prepare-state.json", "train-00000-of-00002.array_record"], left   # meta.json, no temp file

    # Interrupted (Ctrl-C, a kill, a lost node) in its third shard, the same preparation resumes: only the shards not
    # finished are made again, and the set is byte for byte the uninterrupted one (its caption features were hours
    # of a large encoder's time, and a rerun used to start from nothing)
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    seen.clear()
    stop = lambda caps, n: (_ for _ in ()).throw(KeyboardInterrupt) if "picture number 6" in caps else None
    monkeypatch.setattr(minilm, "encode", lambda caps, n: stop(caps, n) or seen.append(list(caps)) or encode(caps, n))
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared_text(OmegaConf.merge(dc, {"name": "st5"}), encoder=minilm)
    assert [len(c) for c in seen] == [2, 1, 2] and not (tmp_path / "prep" / "st5" / "meta.json").exists()
    cut = tmp_path / "prep" / "st5" / ".train-00002-of-00003.array_record.tmp-99999"   # as a kill -9 leaves one
    cut.write_bytes(b"half a shard")
    seen.clear()
    monkeypatch.setattr(minilm, "encode", lambda caps, n: seen.append(list(caps)) or encode(caps, n))
    # resumed from a `cp -r` of the folder (new paths and times, the same bytes), as on a cluster's scratch disk
    import shutil
    copy = tmp_path.parent / f"{tmp_path.name}-copy"
    shutil.copytree(tmp_path, copy, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns("prep"))
    on_copy = {"name": "st5", "folder": str(copy), "captions_file": str(copy / "c.jsonl")}
    meta5, d5 = ensure_prepared_text(OmegaConf.merge(dc, on_copy), encoder=minilm)
    assert seen == [["picture number 5", "picture number 6"]]
    paths = ("folder", "captions_file", "images_sha256")
    strip = lambda m: {**m, "name": "st", "source": None, "text": {**m["text"], "request": {
        k: v for k, v in m["text"]["request"].items() if k not in paths}}}
    assert strip(meta5) == strip(meta) and not (d5 / ".prepare-state.json").exists() and not cut.exists()
    # features from another kind of device differ in the last bits: not resumed into one set
    req = lambda device: text_shards.resume_request({"dim": 4}, 3, type("E", (), {"device": device}))
    assert req("cuda:0") == req("cuda:1") != req("cpu")
    for f in meta["splits"]["train"]["files"]:
        assert (d5 / f).read_bytes() == (d / f).read_bytes(), f


def test_a_folder_is_read_once_and_a_changed_finished_shard_is_made_again(tmp_path, minilm, monkeypatch):
    """Preparing a captioned folder read every image twice: once up front to hash its bytes (the resume key held
    them), then again to decode it; a resume read them all up front again. Now each image is hashed from the bytes
    it is decoded from, each finished shard records its images' hash, and a resume reads again only finished shards'
    files: one whose images changed since (same size and time) is made again, the others are kept."""
    import builtins

    from PIL import Image

    import data.text_shards as text_shards
    from data.folders import bytes_digest

    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"image {i}"}))
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    monkeypatch.setattr(text_shards, "SHARD_BYTES", 2 * 8 * 8 * 3)   # shards of 2 images
    dc = OmegaConf.create({"name": "once", "kind": "folder", "folder": str(tmp_path), "captions_file":
                           str(tmp_path / "c.jsonl"), "size": 8, "root": str(tmp_path / "prep"),
                           "text_encoder": "minilm", "max_tokens": 6, "limit": None})
    reads, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (str(f).endswith(".png") and reads.append(
        os.path.basename(str(f)))) or real_open(f, *a, **k))
    meta, d = ensure_prepared_text(dc, encoder=minilm)
    assert sorted(reads) == [f"{i}.png" for i in range(6)], reads   # each image once (twice before)
    files = [f"{i}.png" for i in range(6)]
    assert meta["text"]["request"]["images_bytes_sha256"] == bytes_digest([tmp_path / f for f in files], files)

    # interrupted in its third shard; meanwhile image 1 (in the first, finished, shard) is edited, keeping its size
    # and time; the resume makes the first shard again and keeps the second
    seen, encode = [], minilm.encode
    stop = lambda caps: (_ for _ in ()).throw(KeyboardInterrupt) if "image 4" in caps else None
    monkeypatch.setattr(minilm, "encode", lambda caps, n: stop(caps) or seen.append(list(caps)) or encode(caps, n))
    again = OmegaConf.merge(dc, {"name": "again"})
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared_text(again, encoder=minilm)
    st = os.stat(tmp_path / "1.png")
    edited = (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    Image.fromarray(edited).save(tmp_path / "1.png")
    assert os.stat(tmp_path / "1.png").st_size == st.st_size   # random pixels: PNG does not compress them
    os.utime(tmp_path / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    seen.clear(), reads.clear()
    monkeypatch.setattr(minilm, "encode", lambda caps, n: seen.append(list(caps)) or encode(caps, n))
    meta2, d2 = ensure_prepared_text(again, encoder=minilm)
    assert seen == [["image 0", "image 1"], ["image 4", "image 5"]], seen
    assert sorted(reads) == [f"{i}.png" for i in (0, 0, 1, 1, 2, 3, 4, 5)], reads   # finished: read and hashed again
    batch = next(make_iterator(meta2, d2, "train", batch_size=6, seed=0, shuffle=False))
    np.testing.assert_array_equal(np.rint((batch["x"][1] + 1) * 127.5), edited)
    assert meta2["text"]["request"]["images_bytes_sha256"] == bytes_digest([tmp_path / f for f in files], files)


def test_a_killed_caption_rebuild_resumes(tmp_path, minilm, monkeypatch, capsys):
    """`prepare_data.py data=folder ... force=true` after the captions were edited, killed outright: the rerun of the
    same command put the old copy back, then refused it as "prepared from something else ... force=true" (the flag
    it was given), and the run after that computed every caption's features again. It now resumes the rebuild."""
    import sys

    from PIL import Image

    import data.rebuild
    import data.text_shards as text_shards
    import prepare_data
    from data.text import TextEncoder
    from training import cli

    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"old caption {i}"}))
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    monkeypatch.setattr(text_shards, "SHARD_BYTES", 2 * 8 * 8 * 3)   # shards of 2 images
    over = {"name": "sq", "kind": "folder", "folder": str(tmp_path), "captions_file": str(tmp_path / "c.jsonl"),
            "size": 8, "root": str(tmp_path / "prep"), "text_encoder": "minilm", "max_tokens": 6, "limit": None}
    dc = OmegaConf.create(over)
    ensure_prepared_text(dc, encoder=minilm)
    (tmp_path / "c.jsonl").write_text("\n".join(r.replace("old", "new") for r in rows))
    d, aside = tmp_path / "prep" / "sq", tmp_path / "prep" / ".sq.replaced-4194304"
    os.rename(d, aside)   # the killed rebuild: the old set aside, one shard of the new one written
    d.mkdir()
    seen, encode = [], TextEncoder.encode
    stop = lambda caps: (_ for _ in ()).throw(KeyboardInterrupt) if "new caption 2" in caps else None
    monkeypatch.setattr(TextEncoder, "encode", lambda self, caps, n, **k: stop(caps) or seen.append(list(caps))
                        or encode(self, caps, n, **k))
    monkeypatch.setattr(data.rebuild, "_REBUILDING", {aside})
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared_text(dc, encoder=minilm)
    monkeypatch.setattr(data.rebuild, "_REBUILDING", set())
    seen.clear()
    monkeypatch.setattr(TextEncoder, "encode", lambda self, caps, n, **k: seen.append(list(caps))
                        or encode(self, caps, n, **k))
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", "data=folder", *[f"data.{k}={v}" for k, v in over.items()
                                                                         if v is not None], "force=true"])
    capsys.readouterr()
    cli.main("prepare", prepare_data.main)
    assert "resuming the stopped rebuild" in capsys.readouterr().out
    assert seen == [["new caption 2", "new caption 3"], ["new caption 4", "new caption 5"]], seen
    assert load_text(load_meta(d), d, "train")["caption"] == [f"new caption {i}" for i in range(6)]
    assert not list(d.parent.glob(".sq.replaced-*"))   # nor the copy the resumed rebuild took over
