"""Captioned emoji rendered from the Noto Color Emoji font (Debian `fonts-noto-color-emoji`), names from `emoji`.

3,655 fully qualified emoji (E <= 15.0); caption = the English CLDR name ("woman police officer medium skin tone").
Pillow pitfalls (../shared/notes/data.md section 2): the colour-bitmap font has one strike, so size must be 109;
RAQM layout is needed or ZWJ/skin-tone sequences fall apart; embedded_color=True or the glyph is blank.
"""

import os

import numpy as np

from training.errors import UserError

FONT = os.environ.get("EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
MAX_VERSION = 15.0


def emoji_items(max_version: float = MAX_VERSION) -> list[tuple[str, str]]:
    """[(emoji string, caption)] in the `emoji` package's order."""
    import emoji

    return [(ch, v["en"].strip(":").replace("_", " ")) for ch, v in emoji.EMOJI_DATA.items()
            if v["status"] == emoji.STATUS["fully_qualified"] and v["E"] <= max_version]


def _font():
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise UserError("Pillow lacks the RAQM layout engine (emoji sequences would break apart): install libfribidi0 "
                        "and a Pillow wheel with raqm")
    if not os.path.isfile(FONT):
        raise UserError(f"{FONT} not found: `apt-get install fonts-noto-color-emoji` (or set EMOJI_FONT)")
    return ImageFont.truetype(FONT, 109, layout_engine=ImageFont.Layout.RAQM)


def render(chars: list[str], size: int, bg=(255, 255, 255)) -> np.ndarray:
    """uint8 (N, size, size, 3): each glyph cropped to its box, centred on a square background, LANCZOS-resized."""
    from PIL import Image, ImageDraw

    font = _font()
    out = np.empty((len(chars), size, size, 3), np.uint8)
    for i, ch in enumerate(chars):
        im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((80, 80), ch, font=font, embedded_color=True, anchor="mm")
        box = im.getbbox()
        if box is None:
            raise UserError(f"emoji {ch!r} rendered blank: the font {FONT} does not cover it")
        im = im.crop(box)
        s = max(im.size)
        sq = Image.new("RGBA", (s, s), tuple(bg) + (255,))
        sq.alpha_composite(im, ((s - im.size[0]) // 2, (s - im.size[1]) // 2))
        out[i] = np.asarray(sq.convert("RGB").resize((size, size), Image.LANCZOS))
    return out


def load_emoji(size: int, max_version: float = MAX_VERSION, limit: int | None = None) -> dict:
    items = emoji_items(max_version)[:limit]
    chars, captions = [c for c, _ in items], [t for _, t in items]
    return {"x": render(chars, size), "captions": captions, "chars": chars,
            "source": f"Noto Color Emoji ({FONT}) rendered at 109 ppem, resized to {size}; captions from `emoji`"}


# ------------------------------------------------------------------------------------------------ the acceptance metric

def features(x_uint8: np.ndarray, pool: int = 2) -> np.ndarray:
    """Feature used to find the nearest real emoji: pixels in [0, 1], average-pooled by `pool` (32 -> 16 px), flattened.

    Why pixels: each caption names one deterministic glyph on a fixed white background, so a good sample should
    reproduce that glyph's layout and colours; no pretrained image model is available offline, and a learned feature
    would hide colour differences (skin tones) that the caption specifies. Pooling forgives one-pixel jitter and
    sampling noise without losing the glyph's colour layout.
    """
    x = x_uint8.astype(np.float32) / 255.0
    n, h, w, c = x.shape
    h, w = h - h % pool, w - w % pool       # an odd size (a folder set at data.size=15): the last row/column is dropped
    x = x[:, :h, :w].reshape(n, h // pool, pool, w // pool, pool, c).mean((2, 4))
    return x.reshape(n, -1)


def target_ranks(generated: np.ndarray, real, target: np.ndarray, features=features, targets=None) -> np.ndarray:
    """For each generated image, how many real images are strictly nearer to it than real[target[i]] (L2 in
    `features`; latent sets pass their own, see training/text_eval.py). 0: the captioned image is the nearest.

    real: an array, or an iterable of its consecutive chunks with `targets` = real[target] (a split larger than
    memory: training/text_eval.py streams it). Each chunk's distance matrix gets the targets' columns appended, so
    a target's distance and its rivals' come out of one product, as they did from the whole split's; the target's
    own column in the chunk is never counted (the same vector in two columns can differ in the last bit)."""
    if isinstance(real, np.ndarray):
        real, targets = [real], real[target]
    g, t = features(generated), features(targets)
    g2, i, rank, start = (g ** 2).sum(1)[:, None], np.arange(len(g)), np.zeros(len(g), np.int64), 0
    for chunk in real:
        r = np.concatenate([features(chunk), t])
        d = g2 - 2 * g @ r.T + (r ** 2).sum(1)[None, :]
        m = len(r) - len(t)
        own = np.asarray(target)[:, None] == start + np.arange(m)[None, :]
        rank += ((d[:, :m] < d[i, m + i][:, None]) & ~own).sum(1)
        start += m
    return rank


def topk_hits(generated: np.ndarray, real: np.ndarray, target: np.ndarray, k: int = 5) -> np.ndarray:
    """For each generated image, whether real[target[i]] is among its k nearest real images (L2 in `features`)."""
    return target_ranks(generated, real, target) < k
