"""Bring-your-own folder layouts (data/folders.py) through the whole latent preparation with a tiny offline VAE:
each layout, split folders, a corrupt image (skipped, counted, the run continues), empty and unknown layouts."""

import json

import numpy as np
import pytest

from test_vae import make_tiny_vae, write_images
from training.errors import UserError


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from data.vae import load_vae

    return load_vae(make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny"))


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
