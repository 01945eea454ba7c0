"""Text encoders (MiniLM shipped offline, T5Gemma from a local directory), emoji rendering, captioned data sets."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.captions import FASHION_NAMES, ensure_prepared_text, fashion_captions, read_folder
from data.loader import load_text
from data.text import get_encoder
from training.errors import UserError


def test_minilm_token_states_and_mask(minilm):
    caps = ["a red apple", "a woman police officer with medium skin tone riding a bicycle"]
    minilm.reset_counts()   # (a session-wide fixture)
    states, mask = minilm.encode(caps, max_tokens=8)
    assert states.shape == (2, 8, 384) and mask.dtype == bool
    assert mask[0].sum() == 5 and mask[1].all()                     # [CLS] a red apple [SEP]; the long one truncated
    assert np.all(states[0, ~mask[0]] == 0) and np.abs(states[0, mask[0]]).sum() > 0
    # what one padded, truncating tokenizer call gives (encode tokenizes once and cuts only the long ones)
    import torch
    b = minilm.tokenizer(caps, padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    with torch.inference_mode():
        h = minilm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state.numpy()
    np.testing.assert_array_equal(mask, b["attention_mask"].numpy().astype(bool))
    np.testing.assert_array_equal(states, h * mask[..., None])
    assert minilm.truncation_note("captions", 8).startswith("note: 1 of 2 captions")
    alone, _ = minilm.encode(caps[:1], max_tokens=8)                 # padding/batching does not change the states
    np.testing.assert_allclose(alone[0], states[0], atol=1e-5)
    # mean-pooled + normalised states are sentence embeddings: related captions are closer
    e = lambda s, m: (s * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    s3, m3 = minilm.encode(["a green apple", "a steam locomotive"], max_tokens=8)
    v = e(np.concatenate([states[:1], s3]), np.concatenate([mask[:1], m3]))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_t5gemma_from_a_local_directory(tmp_path, minilm, monkeypatch):
    from transformers import T5GemmaConfig, T5GemmaModuleConfig, T5GemmaModel

    mod = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
               max_position_embeddings=64)
    cfg = T5GemmaConfig(encoder=T5GemmaModuleConfig(**mod), decoder=T5GemmaModuleConfig(**mod), vocab_size=30522,
                        is_encoder_decoder=True)
    T5GemmaModel(cfg).save_pretrained(tmp_path / "t5g")          # a full enc-dec checkpoint, random weights
    minilm.tokenizer.save_pretrained(tmp_path / "t5g")           # any tokenizer with a matching vocabulary
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)   # set by other test files at import; not when run alone
    enc = get_encoder("t5gemma", str(tmp_path / "t5g"))
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1" and enc.dim == 32
    states, mask = enc.encode(["a red apple", "a cat"], max_tokens=6)
    assert states.shape == (2, 6, 32) and mask.sum(1).tolist() == [5, 4] and np.isfinite(states).all()
    with pytest.raises(UserError, match=r"text_encoder_path=.*missing: no such directory"):   # not a hub-id line
        get_encoder("t5gemma", str(tmp_path / "missing"))
    with pytest.raises(UserError):
        get_encoder("clip")
    import torch
    if not torch.cuda.is_available():   # DIT_TEXT_DEVICE=cuda under the CPU wheel: named, before the model loads
        monkeypatch.setenv("DIT_TEXT_DEVICE", "cuda")
        with pytest.raises(UserError, match=r"text encoder device 'cuda' .* use DIT_TEXT_DEVICE=cpu, or install"):
            get_encoder("t5gemma", str(tmp_path / "t5g"))
    # Other weights at data.text_encoder_path (another random init of the same config) are another encoder: a set
    # prepared with the first is refused for the second (it was silently reused); moved weights are the same one.
    import shutil

    import torch

    from data.text_reuse import check_reuse, request
    from data.text import encoder_weights
    shutil.copytree(tmp_path / "t5g", tmp_path / "t5g_moved")
    torch.manual_seed(1)
    T5GemmaModel(cfg).save_pretrained(tmp_path / "t5g_other")
    ids = [encoder_weights("t5gemma", str(tmp_path / n)) for n in ("t5g", "t5g_moved", "t5g_other")]
    assert ids[0] == ids[1] != ids[2] and ids[0]
    dc = OmegaConf.create({"kind": "emoji", "size": 8, "limit": 4, "text_encoder": "t5gemma", "max_tokens": 6,
                           "text_encoder_path": str(tmp_path / "t5g")})
    meta = {"text": {"request": request(dc)}}
    check_reuse(meta, OmegaConf.merge(dc, {"text_encoder_path": str(tmp_path / "t5g_moved")}), tmp_path)
    with pytest.raises(UserError, match="text_encoder_weights"):
        check_reuse(meta, OmegaConf.merge(dc, {"text_encoder_path": str(tmp_path / "t5g_other")}), tmp_path)
    del meta["text"]["request"]["text_encoder_weights"]     # a set prepared before the key existed: not held against it
    check_reuse(meta, OmegaConf.merge(dc, {"text_encoder_path": str(tmp_path / "t5g_other")}), tmp_path)


def test_emoji_render_and_captions():
    from PIL import features

    from data.emoji import emoji_items, render, topk_hits
    assert features.check("raqm")
    items = emoji_items()
    assert len(items) == 3655
    caps = dict((c, t) for c, t in items)
    family = "\U0001F468\u200D\U0001F469\u200D\U0001F467"          # a ZWJ sequence: must render as ONE glyph
    assert caps["\U0001F600"] == "grinning face" and family in caps
    x = render(["\U0001F600", family, "\U0001F34E"], 32)
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8
    for im in x:
        assert (im.astype(int).sum(-1) < 600).mean() > 0.2           # coloured, not a blank white square
    apple = x[2].astype(int)
    assert apple[..., 0].mean() > apple[..., 2].mean() + 10          # the red apple is red
    # the metric: each real image is its own nearest neighbour
    assert topk_hits(x, x, np.arange(3), k=1).all()
    assert not topk_hits(x[[1, 0, 2]], x, np.arange(3), k=1)[:2].any()
    odd = x[:, :15, :15]      # a folder set at an odd data.size: scored too (it was a reshape error after training)
    assert topk_hits(odd, odd, np.arange(3), k=1).all()


def test_caption_ranks_stream_the_split(tmp_path):
    """Stage 2's end-of-run ranking read the whole train split into memory (a 100k-image folder at 256 px: 20 GB;
    with its ~8x float32 features, more). Streamed in chunks it gives the same ranks, ties with duplicates included."""
    from data.emoji import target_ranks
    from data.loader import StoredImages
    from data.prepare import prepare_arrays

    rng = np.random.default_rng(0)
    real = np.clip(128 + rng.normal(0, 15, (50, 8, 8, 3)), 0, 255).astype(np.uint8)   # near one another
    real[7] = real[3]                                 # a duplicate: it ties with its twin, never nearer
    meta = prepare_arrays(tmp_path, "r", {"train": (real, np.zeros(50, int))}, ["a"], "t", num_shards={"train": 3})
    target = np.array([3, 7, 0, 49, 20, 21])
    mix = rng.uniform(0.3, 0.9, (6, 1, 1, 1))            # part another image: the target is not always nearest
    gen = (mix * real[(target + 1) % 50] + (1 - mix) * real[target]).astype(np.uint8)
    whole = target_ranks(gen, real, target)
    assert whole.max() > 0 and len(set(whole.tolist())) > 2    # ranks that can differ
    split = StoredImages(meta, tmp_path, "train")
    assert len(split) == 50
    np.testing.assert_array_equal(split.take(target), real[target])
    assert [len(c) for c in split.chunks(16)] == [16, 16, 16, 2]
    for size in (16, 7, 50):
        np.testing.assert_array_equal(target_ranks(gen, split.chunks(size), target, targets=split.take(target)), whole)
    assert target_ranks(real[[3, 7]], real, np.array([3, 7])).tolist() == [0, 0]


def test_fashion_captions_and_folder(tmp_path):
    y = np.array([0, 9, 3, 3])
    caps = fashion_captions(y)
    assert all(FASHION_NAMES[c] in s for c, s in zip(y, caps)) and caps == fashion_captions(y)
    from PIL import Image
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"file": "a.png", "caption": "red"}) + "\n")
    x, c = read_folder(tmp_path, tmp_path / "c.jsonl", 16)
    assert x.shape == (1, 16, 16, 3) and c == ["red"] and (x[..., 0] == 255).all()
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(UserError):
        read_folder(tmp_path, tmp_path / "bad.jsonl", 16)
    # Files a user's editor writes: a BOM (Notepad, Excel) and a raw U+2028 inside a caption are read; Latin-1 and
    # a null / numeric file name are one line each (they were a JSON error, a UnicodeDecodeError and a TypeError)
    line = json.dumps({"file": "a.png", "caption": "red\u2028square"}, ensure_ascii=False)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + line + "\n" + line + "\n", encoding="utf-8")
    x, c = read_folder(tmp_path, tmp_path / "bom.jsonl", 16)
    assert c == ["red\u2028square"] * 2
    x, c = read_folder(tmp_path, tmp_path / "bom.jsonl", 16, limit=1)       # data.limit applies to folders too
    assert len(c) == 1
    (tmp_path / "l1.jsonl").write_bytes('{"file": "a.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_folder(tmp_path, tmp_path / "l1.jsonl", 16)
    for f in ("null", "5"):
        (tmp_path / "nf.jsonl").write_text('{"file": %s, "caption": "red"}\n' % f)
        with pytest.raises(UserError, match="line 1: file must be a path"):
            read_folder(tmp_path, tmp_path / "nf.jsonl", 16)


def test_fashion_mnist_text_at_another_size_is_one_line(tmp_path):
    """data.size was ignored for Fashion-MNIST's captioned copy: the set came out 28x28 whatever was asked."""
    from training.cli import compose

    dc = compose("stage2", ["data=fashion_mnist_text", "data.size=32", f"data.root={tmp_path}"]).data
    with pytest.raises(UserError, match="data.size=32: Fashion-MNIST's images are 28x28"):
        ensure_prepared_text(dc)
    assert not (tmp_path / "fashion_mnist_text").exists()   # nothing prepared (a lock file aside)


def test_max_tokens_outside_the_encoders_range_is_one_line(minilm):
    """MiniLM takes 3 to 512 tokens ([CLS] and [SEP] included): 600 was a torch size error, 1 a broadcast error."""
    for n in (1, 2, 600):
        with pytest.raises(UserError, match=f"data.max_tokens={n} is outside what the minilm text encoder takes: "
                                            "use 3 to 512"):
            minilm.encode(["a red apple"], n)
    assert minilm.encode(["a red apple"], 3)[0].shape == (1, 3, 384)


def _text_set(out, n=6, request=None):
    from data.prepare import prepare_arrays

    rng = np.random.default_rng(0)
    text = {"train": {"text": rng.normal(size=(n, 3, 8)).astype(np.float16), "mask": np.ones((n, 3), bool),
                      "caption": [f"caption {i}" for i in range(n)]}}
    tm = {"encoder": "minilm", "dim": 8, "max_tokens": 3, **({"request": request} if request else {})}
    x = rng.integers(0, 255, (n, 4, 4, 1)).astype(np.uint8)
    return prepare_arrays(out, "t", {"train": (x, np.zeros(n, np.int64))}, ["a"], "test", text=text, text_meta=tm)


def test_resume_identity_tells_other_captions_apart(tmp_path):
    """A captioned set re-prepared (force=true) from other captions with the same record count used to be resumed on
    silently: the data identity held counts and shape only."""
    from data.prepare import data_identity, data_mismatch

    req = {"kind": "folder", "limit": None, "size": 4, "text_encoder": "minilm", "max_tokens": 3,
           "folder": "/a", "captions_file": "/a/c.jsonl", "captions_sha256": "1" * 64}
    a = _text_set(tmp_path / "a", request=req)
    b = _text_set(tmp_path / "b", request={**req, "captions_sha256": "2" * 64})
    moved = _text_set(tmp_path / "c", request={**req, "folder": "/elsewhere", "captions_file": "/elsewhere/c.jsonl"})
    saved = {"data_identity": data_identity(a)}
    assert data_mismatch(saved, b) == "text.captions_sha256: run '111111111111...' vs now '222222222222...'"
    assert data_mismatch(saved, moved) is None          # the same captions from a moved folder: the same data
    old = {"data_identity": {k: v for k, v in data_identity(a).items() if k != "text"}}
    assert data_mismatch(old, b) is None                # checkpoints written before the key are not refused


def test_load_text_reads_only_the_records_asked_for(tmp_path):
    """train_stage2.py / sample.py used to read every caption's features (float32; Fashion-MNIST's: 1.5 GB) to pick
    8-200 of them."""
    meta = _text_set(tmp_path / "t", n=7)
    full = load_text(meta, tmp_path / "t", "train")
    idx = np.array([6, 0, 3, 3])
    some = load_text(meta, tmp_path / "t", "train", idx)
    assert some["caption"] == [full["caption"][i] for i in idx]
    np.testing.assert_array_equal(some["text"], full["text"][idx])
    np.testing.assert_array_equal(some["mask"], full["mask"][idx])
    with pytest.raises(UserError):
        load_text(meta, tmp_path / "t", "train", [7])


def test_builtin_caption_features_are_made_a_batch_at_a_time(minilm, monkeypatch):
    """A built-in captioned set's features were computed for the whole split at once in float32 (60k x 16 x 384:
    1.5 GB; a T5Gemma-2b, 8.8 GB) and then copied to float16. Now a batch at a time into float16: the same bits."""
    import data.text_shards as text_shards
    from data.captions import _features_f16

    caps = fashion_captions(np.arange(11) % 10)
    states, mask = minilm.encode(caps, 8)
    calls = []
    encode = minilm.encode
    monkeypatch.setattr(minilm, "encode", lambda c, n: calls.append(len(c)) or encode(c, n))
    monkeypatch.setattr(text_shards, "FEATURE_BATCH", 4)
    got = _features_f16(minilm, caps, 8)
    assert calls == [4, 4, 3] and got["text"].dtype == np.float16 and got["caption"] == caps
    assert np.array_equal(got["text"].view(np.uint16), states.astype(np.float16).view(np.uint16))
    assert np.array_equal(got["mask"], mask)


def test_captions_cut_to_max_tokens_are_said(minilm, capsys):
    """A prompt or caption longer than data.max_tokens was cut without a word (its images were those of its start)."""
    from data.prompts import prompt_conds

    meta = {"text": {"encoder": "minilm", "max_tokens": 6}, "splits": {}}
    long = "a red apple on a wooden table next to a glass of milk"
    idx, _, prompts = prompt_conds([long, "a cat"], 2, meta, None)
    out = capsys.readouterr().out
    assert "note: 1 of 2 prompts are longer than data.max_tokens=6 tokens" in out and "'a red apple on" in out, out
    prompt_conds(["a cat", "a dog"], 2, meta, None)
    assert "note:" not in capsys.readouterr().out
