"""Bring-your-own folder layouts (data/folders.py) through the whole latent preparation with a tiny offline VAE:
each layout, split folders, a corrupt image (skipped, counted, the run continues), empty and unknown layouts."""

import json

import numpy as np
import pytest
from PIL import Image

from test_vae import write_images
from training.errors import UserError


def _prep(src, vae, out, **kw):
    from data.encode import prepare_latents

    return prepare_latents(str(src), vae, out, resolution=8, progress=False, **{"shard_size": 4, **kw})


def test_imagefolder_with_split_folders(vae, tmp_path):
    from data.loader import load_split

    write_images(tmp_path / "s" / "train" / "zebra", ["1.png", "2.png", "3.png"])
    write_images(tmp_path / "s" / "train" / "ant", ["1.jpg", "2.webp"])
    write_images(tmp_path / "s" / "val" / "ant", ["9.png"])
    write_images(tmp_path / "s" / "val" / "zebra", ["8.png"])
    meta = _prep(tmp_path / "s", vae, tmp_path / "o")
    assert meta["encoder"]["layout"] == "imagefolder" and meta["class_names"] == ["ant", "zebra"]
    assert {s: v["num_records"] for s, v in meta["splits"].items()} == {"train": 5, "test": 2}
    _, y = load_split(meta, tmp_path / "o", "train")
    assert y.tolist() == [0, 0, 1, 1, 1]           # sorted classes, sorted files
    _, y = load_split(meta, tmp_path / "o", "test")
    assert y.tolist() == [0, 1]


def test_flat_with_labels_csv_and_jsonl(vae, tmp_path):
    from data.loader import load_split

    write_images(tmp_path / "c", ["x.png", "y.png", "z.png"])
    (tmp_path / "c" / "labels.csv").write_text("file,label\nx.png,shirt\ny.png,bag\nz.png,shirt\n")
    meta = _prep(tmp_path / "c", vae, tmp_path / "oc")
    assert meta["encoder"]["layout"] == "labels" and meta["class_names"] == ["bag", "shirt"]
    assert load_split(meta, tmp_path / "oc", "train")[1].tolist() == [1, 0, 1]   # labels.csv row order

    write_images(tmp_path / "j", ["a.png", "b.png"])
    (tmp_path / "j" / "labels.jsonl").write_text('{"file": "a.png", "label": 3}\n{"file_name": "b.png", "label": 1}\n')
    meta = _prep(tmp_path / "j", vae, tmp_path / "oj")
    assert meta["num_classes"] == 4 and load_split(meta, tmp_path / "oj", "train")[1].tolist() == [3, 1]

    (tmp_path / "j" / "labels.jsonl").write_text('{"file": "a.png", "label": 3}\n{"file": "gone.png", "label": 1}\n')
    with pytest.raises(UserError, match="gone.png"):
        _prep(tmp_path / "j", vae, tmp_path / "oj2")


def test_flat_with_captions_and_hflip(vae, tmp_path):
    from data.loader import load_split

    write_images(tmp_path / "c", ["p.png", "q.png"], size=(8, 8))
    (tmp_path / "c" / "captions.jsonl").write_text('{"file": "p.png", "caption": "a red cat"}\n'
                                                   '{"file": "q.png", "text": "two dogs"}\n')
    meta = _prep(tmp_path / "c", vae, tmp_path / "o", hflip=True, dtype="float32")
    assert meta["encoder"]["layout"] == "captions" and meta["class_names"] == ["all"]
    assert meta["splits"]["train"]["num_records"] == 4
    caps = [json.loads(l) for l in (tmp_path / "o" / "captions-train.jsonl").read_text().splitlines()]
    assert [(c["caption"], c["flipped"]) for c in caps] == [("a red cat", False), ("a red cat", True),
                                                            ("two dogs", False), ("two dogs", True)]
    from data.folders import load_image
    x, _ = load_split(meta, tmp_path / "o", "train")
    img = load_image(tmp_path / "c" / "p.png", 8, 3)
    np.testing.assert_allclose(x[0], vae.encode(img[None])[0], atol=1e-5)
    np.testing.assert_allclose(x[1], vae.encode(img[None, :, ::-1])[0], atol=1e-5)   # flipped copy right after


def test_corrupt_image_is_skipped_and_counted(vae, tmp_path):
    write_images(tmp_path / "s" / "a", ["1.png", "2.png", "3.png"])
    write_images(tmp_path / "s" / "b", ["4.png", "5.png"])
    (tmp_path / "s" / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.warns(UserWarning) as rec:
        meta = _prep(tmp_path / "s", vae, tmp_path / "o")
    msgs = [str(w.message) for w in rec]
    assert any("2.png" in m and "cannot decode" in m for m in msgs) and any("1 undecodable" in m for m in msgs)
    assert meta["splits"]["train"]["num_records"] == 4 and meta["splits"]["train"]["skipped"] == 1


def test_empty_and_unknown_layouts_are_clear_errors(vae, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        _prep(tmp_path / "empty", vae, tmp_path / "o")
    write_images(tmp_path / "flat", ["1.png", "2.png"])        # flat images but no labels or captions file
    with pytest.raises(UserError) as e:
        _prep(tmp_path / "flat", vae, tmp_path / "o")
    msg = str(e.value)
    assert "found 2 image files, 0 sub-folders" in msg and "ImageFolder" in msg and "labels.csv" in msg
    assert "captions.jsonl" in msg and "\n" not in msg
    (tmp_path / "dirs" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images inside"):
        _prep(tmp_path / "dirs", vae, tmp_path / "o")
    with pytest.raises(UserError, match="not a folder"):
        _prep(tmp_path / "missing", vae, tmp_path / "o")


def test_val_and_test_together_are_refused(tmp_path):
    from data.folders import scan_source

    for split in ("train", "val", "test"):
        write_images(tmp_path / "s" / split / "cat", ["1.png"])
    with pytest.raises(UserError, match=r"several held-out folders \(val, test\)") as e:
        scan_source(tmp_path / "s")
    assert "\n" not in str(e.value)
    (tmp_path / "s" / "val" / "cat" / "1.png").unlink(), (tmp_path / "s" / "val" / "cat").rmdir()
    (tmp_path / "s" / "val").rmdir()
    assert {k: len(v.files) for k, v in scan_source(tmp_path / "s").splits.items()} == {"train": 1, "test": 1}


def test_only_ascii_digit_labels_are_class_ids(tmp_path):
    from data.folders import scan_source

    write_images(tmp_path / "c", ["a.png", "b.png", "c.png"])
    (tmp_path / "c" / "labels.csv").write_text("file,label\na.png,1\nb.png,²\nc.png,1\n", encoding="utf-8")
    src = scan_source(tmp_path / "c")     # '²'.isdigit() is True, but it is a name: every label is then a name
    assert src.class_names == ["1", "²"] and src.splits["train"].labels == [0, 1, 0]
    (tmp_path / "c" / "labels.csv").write_text("file,label\na.png,2\nb.png, 0\nc.png,2\n")
    src = scan_source(tmp_path / "c")
    assert src.class_names == ["0", "1", "2"] and src.splits["train"].labels == [2, 0, 2]


def test_decompression_bomb_is_a_skipped_image(tmp_path, monkeypatch):
    from PIL import Image

    from data.folders import load_image

    write_images(tmp_path, ["big.png"])                 # 12 x 10 = 120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # over twice the limit: PIL raises DecompressionBombError
    with pytest.warns(UserWarning, match="big.png: cannot decode it as an image \\(DecompressionBombError\\)"):
        assert load_image(tmp_path / "big.png", 8, 3) is None


def test_symlinked_images_outside_the_source(vae, tmp_path):
    """A subset built from links to a pool elsewhere; two links to one file stay two examples."""
    from data.loader import load_split

    write_images(tmp_path / "pool", ["0.png", "1.png"], seed=3)
    for cls, target in (("a", "0.png"), ("b", "1.png"), ("b", "0.png")):
        (tmp_path / "subset" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "subset" / cls / f"link-{target}").symlink_to(tmp_path / "pool" / target)
    meta = _prep(tmp_path / "subset", vae, tmp_path / "o")
    assert meta["class_names"] == ["a", "b"] and meta["splits"]["train"]["num_records"] == 3
    x, y = load_split(meta, tmp_path / "o", "train")
    assert y.tolist() == [0, 1, 1] and np.array_equal(x[0], x[1]) and not np.array_equal(x[0], x[2])


def test_an_encode_interrupted_under_an_older_image_reader_is_encoded_whole(vae, tmp_path, capsys):
    """An encode interrupted before photos were turned upright by their EXIF orientation, and resumed after, kept its
    finished shards and wrote the rest with the new reader: a rotated photo could be stored both ways. Such a resume
    now encodes the whole set again; a complete set is left as it is."""
    from data.encode import STATE_FILE

    write_images(tmp_path / "s" / "a", [f"{i}.png" for i in range(5)])
    write_images(tmp_path / "s" / "b", [f"{i}.png" for i in range(4)], seed=1)
    meta = _prep(tmp_path / "s", vae, tmp_path / "full", shard_size=3)

    def stop_after_one(name):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=stop_after_one)
    state = json.loads((tmp_path / "o" / STATE_FILE).read_text())
    assert len(state["shards"]) == 1
    state.pop("reader", None)                              # what the encoder wrote before the reader was versioned
    (tmp_path / "o" / STATE_FILE).write_text(json.dumps(state))
    written = []
    assert _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=written.append) == {**meta, "name": "o"}
    assert len(written) == 3 and "encoding all of it again" in capsys.readouterr().out
    shards = lambda d: {p.name: p.read_bytes() for p in d.glob("*.array_record")}
    assert shards(tmp_path / "o") == shards(tmp_path / "full")
    # a complete set made under the older reader is reused as it is, without a word about readers
    state = json.loads((tmp_path / "full" / STATE_FILE).read_text())
    state.pop("reader", None)
    (tmp_path / "full" / STATE_FILE).write_text(json.dumps(state))
    assert _prep(tmp_path / "s", vae, tmp_path / "full", shard_size=3, on_shard=written.append) == meta
    assert len(written) == 3 and "already prepared" in capsys.readouterr().out


def test_a_lost_shard_is_re_encoded_alone(vae, tmp_path, capsys):
    write_images(tmp_path / "s" / "a", [f"{i}.png" for i in range(5)])
    write_images(tmp_path / "s" / "b", [f"{i}.png" for i in range(4)], seed=1)
    meta = _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3)
    shards = {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.array_record")}
    assert len(shards) == 3
    written = []
    assert _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=written.append) == meta
    assert written == [] and "already prepared" in capsys.readouterr().out
    lost, damaged = sorted(shards)[0], sorted(shards)[2]
    (tmp_path / "o" / lost).unlink()
    (tmp_path / "o" / damaged).write_bytes(shards[damaged][:-20])     # truncated: its index is gone
    assert _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=written.append) == meta
    assert sorted(written) == [lost, damaged] and "2 of 3 shards are missing or damaged" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.array_record")} == shards   # bitwise


def test_edited_captions_and_class_names_re_prepare(vae, tmp_path):
    write_images(tmp_path / "c", ["p.png", "q.png"], size=(8, 8))
    caps = tmp_path / "c" / "captions.jsonl"
    caps.write_text('{"file": "p.png", "caption": "a red cat"}\n{"file": "q.png", "caption": "two dogs"}\n')
    _prep(tmp_path / "c", vae, tmp_path / "o")
    caps.write_text('{"file": "p.png", "caption": "a blue cat"}\n{"file": "q.png", "caption": "two dogs"}\n')
    _prep(tmp_path / "c", vae, tmp_path / "o")
    out = [json.loads(l)["caption"] for l in (tmp_path / "o" / "captions-train.jsonl").read_text().splitlines()]
    assert out == ["a blue cat", "two dogs"]
    # a caption no record can hold (a lone surrogate) is named at the listing, before any image is encoded
    from data.folders import scan_source
    caps.write_text('{"file": "p.png", "caption": "a blue cat"}\n{"file": "q.png", "caption": "\\udc80 dogs"}\n')
    with pytest.raises(UserError, match=r"captions.jsonl: the caption of q.png is not valid text .*lone surrogate"):
        scan_source(tmp_path / "c")

    write_images(tmp_path / "l", ["x.png", "y.png"])
    (tmp_path / "l" / "labels.csv").write_text("file,label\nx.png,cat\ny.png,dog\n")
    assert _prep(tmp_path / "l", vae, tmp_path / "ol")["class_names"] == ["cat", "dog"]
    (tmp_path / "l" / "labels.csv").write_text("file,label\nx.png,cat\ny.png,dogs\n")   # same ids, new name
    assert _prep(tmp_path / "l", vae, tmp_path / "ol")["class_names"] == ["cat", "dogs"]


def test_latents_refuse_on_the_fly_flips(vae, tmp_path):
    from data.loader import make_iterator

    write_images(tmp_path / "s" / "a", ["1.png", "2.png"])
    meta = _prep(tmp_path / "s", vae, tmp_path / "o")
    assert next(make_iterator(meta, tmp_path / "o", "train", batch_size=2, seed=0))["x"].shape == (2, 4, 4, 4)
    with pytest.raises(UserError, match="cannot be flipped on the fly: set data.hflip=false") as e:
        make_iterator(meta, tmp_path / "o", "train", batch_size=2, seed=0, hflip=True)
    assert "\n" not in str(e.value)


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert() clips 16-bit, 32-bit and float grey to 0..255 (a 16-bit ramp came out nearly white): each
    must load as its 8-bit version does."""
    from PIL import Image

    from data.folders import load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    u16 = np.rint(ramp * 65535).astype(np.uint16)
    Image.fromarray(u16).save(tmp_path / "i16.png")
    Image.frombytes("I;16B", (64, 64), u16.astype(">u2").tobytes()).save(tmp_path / "i16b.tif")
    Image.fromarray(u16.astype(np.int32)).save(tmp_path / "i.tif")                      # 32-bit, 16-bit values
    Image.fromarray(np.rint(ramp * 1e6 - 5e5).astype(np.int32)).save(tmp_path / "iwide.tif")   # its own range
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f01.tif")                 # float in [0, 1]
    Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / "f255.tif")        # float in [0, 255]
    modes = {"i16.png": "I;16", "i16b.tif": "I;16B", "i.tif": "I", "iwide.tif": "I", "f01.tif": "F", "f255.tif": "F"}
    for ch in (3, 1):
        ref = load_image(tmp_path / "ref.png", 32, ch).astype(int)
        for name, mode in modes.items():
            with Image.open(tmp_path / name) as im:
                assert im.mode == mode, name
            np.testing.assert_allclose(load_image(tmp_path / name, 32, ch), ref, atol=1, err_msg=f"{name} {ch}")


def test_stage2_read_folder_decodes_as_stage1_does(tmp_path):
    """read_folder (stage 2) composited nothing (a transparent area holding red stayed red) and clipped 16-bit."""
    from PIL import Image

    from data.captions import read_folder

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:8, :, 3] = 255                                # top half opaque red, bottom half transparent red
    Image.fromarray(rgba).save(tmp_path / "t.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "g.png")   # mid grey, 16-bit
    (tmp_path / "c.jsonl").write_text('{"file": "t.png", "caption": "red"}\n{"file": "g.png", "caption": "grey"}\n')
    x, _ = read_folder(tmp_path, tmp_path / "c.jsonl", 8)
    top, bottom = x[0, :2].astype(int), x[0, 6:].astype(int)       # LANCZOS rings a little by the edge
    assert (abs(top - [255, 0, 0]) <= 2).all() and (bottom >= 253).all()   # transparent -> white, as load_image
    assert (x[1] == 128).all()


def test_empty_class_folders_are_refused(tmp_path):
    """An empty class folder was dropped, so the classes after it got other ids than their sorted-folder index."""
    from data.folders import scan_source

    for cls in ("a", "d"):
        write_images(tmp_path / "s" / cls, ["1.png"])
    (tmp_path / "s" / "b").mkdir()
    write_images(tmp_path / "s" / "c" / "nested", ["1.png"])   # images only in a sub-folder: not read either
    with pytest.raises(UserError, match=r"no image files directly inside: b, c \(add images or remove them\)") as e:
        scan_source(tmp_path / "s")
    assert "\n" not in str(e.value)


def test_tables_with_a_utf8_bom(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM, which turned the header into '\\ufefffile' and was refused."""
    from data.folders import scan_source

    write_images(tmp_path / "c", ["a.png", "b.png"])
    (tmp_path / "c" / "labels.csv").write_text("file,label\na.png,dog\nb.png,cat\n", encoding="utf-8-sig")
    src = scan_source(tmp_path / "c")
    assert src.class_names == ["cat", "dog"] and src.splits["train"].labels == [1, 0]
    (tmp_path / "c" / "labels.csv").unlink()
    (tmp_path / "c" / "labels.jsonl").write_text('{"file": "a.png", "label": 2}\n{"file": "b.png", "label": 0}\n',
                                                 encoding="utf-8-sig")
    assert scan_source(tmp_path / "c").splits["train"].labels == [2, 0]


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo is stored sideways with an EXIF orientation tag; viewers (and users) see it upright. It was
    loaded sideways by both stages' readers."""
    from PIL import Image

    from data.folders import open_image

    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = (255, 0, 0)     # stored: red on the left, blue on the right
    a[:, 8:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6           # orientation 6: rotate 90 degrees clockwise to view
    im.save(tmp_path / "p.jpg", exif=exif, quality=100)
    up = np.asarray(open_image(tmp_path / "p.jpg", 3)).astype(int)
    assert up.shape == (16, 8, 3)                                     # upright: portrait
    assert up[2, 4, 0] > 200 and up[2, 4, 2] < 60 and up[13, 4, 2] > 200 and up[13, 4, 0] < 60   # red on top


def test_labels_file_may_name_images_in_sub_folders(tmp_path):
    """labels.csv listing images/<file> (as captions.jsonl may) was ignored: with no image directly inside, the folder
    was read as an ImageFolder with one class, "images", and an encode trained one class without a word."""
    from data.folders import scan_source

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "labels.csv").write_text("file,label\nimages/0.png,cat\nimages/1.png,dog\nimages/2.png,cat\n")
    src = scan_source(tmp_path)
    assert src.layout == "labels" and src.class_names == ["cat", "dog"]
    assert src.splits["train"].labels == [0, 1, 0]
    (tmp_path / "labels.csv").write_text("file,label\nimages/0.png,cat\nimages/9.png,dog\n")
    with pytest.raises(UserError, match="names images/9.png, which is not a file"):
        scan_source(tmp_path)
    # integer labels are class ids 0..K-1: a date as a label made 20 million (empty) classes without a word
    (tmp_path / "labels.csv").write_text("file,label\nimages/0.png,0\nimages/1.png,20240101\n")
    with pytest.raises(UserError, match="run up to 20240101 but only 2 distinct values"):
        scan_source(tmp_path)


def test_a_damaged_exif_block_keeps_the_image_as_stored(tmp_path):
    """A JPEG whose EXIF tag has a corrupt type field decodes fine, but Pillow's exif_transpose raised struct.error,
    which no reader caught: a stage-1 encode and stage 2's folder reader ended in a traceback over one photo."""
    from PIL import Image

    from data.folders import load_image, open_image

    a = (np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)
    exif = Image.fromarray(a).getexif()
    exif[0x0112], exif[0x010F], exif[0x0132] = 6, "Canon", "2020:01:01 00:00:00"
    raw = bytearray(exif.tobytes())
    for i, v in zip([17, 56, 58, 77], [0x53, 0x46, 0x86, 0x4b]):   # one tag's type and count bytes damaged
        raw[i] = v
    Image.fromarray(a).save(tmp_path / "bad.jpg", "JPEG", exif=bytes(raw))
    with pytest.warns(UserWarning, match="EXIF block is damaged"):
        im = open_image(tmp_path / "bad.jpg", 3)
    assert im.size == (50, 40)                                        # as stored: not rotated, not lost
    with pytest.warns(UserWarning, match="EXIF"):
        assert load_image(tmp_path / "bad.jpg", 16, 3).shape == (16, 16, 3)


def test_captions_file_may_name_images_in_sub_folders(tmp_path):
    """captions.jsonl listing images/<file> was read as an ImageFolder with one class 'images' and its captions
    dropped (the encode then made latents that stage 2 refuses)."""
    from data.folders import scan_source

    (tmp_path / "images").mkdir()
    rows = []
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(json.dumps({"file": f"images/{i}.png", "caption": f"grey {i}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    src = scan_source(tmp_path)
    assert src.layout == "captions"
    assert src.splits["train"].captions == ["grey 0", "grey 1", "grey 2"]
