"""How the project's FD (training/evaluate.py) reacts to known image changes, and where a set of samples loses.
Prints JSON. Used for the issue-3 analysis in development_log.md.

    python bench/fd_sensitivity.py [data_dir=prepared/fashion_mnist] [samples.npz ...]

For real test set A (1000 images) against: real set B (the floor), B blurred (sigma 0.5 / 0.8 px), B + N(0, 8^2)
noise, B x 1.1, B with gamma 0.8, B with a random half mirrored
(what training with hflip teaches); per class, the share of test images that face like the class mean rather than
its mirror; then for each npz from sample.py: the FD split into its mean and covariance terms, FD per class,
per-class pixel mean / spread across images, and background haze / sharpness (pixel_stats), next to the real ones,
and how much of the evaluator's FD ratio is tone (tone_share): the ratio as sampled, with the pixel values mapped
through one monotone curve onto the train split's value distribution, and with grey below 16 set to 0. Diagnostics
only: nothing the project writes is ever edited this way.
"""

import json
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage as nd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.loader import load_split  # noqa: E402
from data.meta import load_meta  # noqa: E402
from training.evaluate import _apply, frechet_distance, get_evaluator  # noqa: E402


def parts(f1, f2) -> dict:
    mean = float(np.sum((f1.mean(0) - f2.mean(0)) ** 2))
    fd = frechet_distance(f1, f2)
    return {"fd": round(fd, 2), "mean_term": round(mean, 2), "cov_term": round(fd - mean, 2)}


def u8(x) -> np.ndarray:
    """Float pixel values -> uint8, clipped and rounded as the samplers write them."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pixel_stats(x) -> dict:
    """Tone, background and sharpness: mean grey level, share of pixels at grey >= 224 (near-white), exactly 0 and at
    grey 1-7 (haze), mean |4-neighbour Laplacian|."""
    a = x[..., 0].astype(np.float32)
    lap = 4 * a[:, 1:-1, 1:-1] - a[:, :-2, 1:-1] - a[:, 2:, 1:-1] - a[:, 1:-1, :-2] - a[:, 1:-1, 2:]
    return {"mean": round(float(a.mean()), 1), "grey_224_up": round(float(np.mean(x >= 224)), 3),
            "zero": round(float(np.mean(x == 0)), 3), "grey_1_7": round(float(np.mean((x >= 1) & (x <= 7))), 3),
            "mean_abs_laplacian": round(float(np.abs(lap).mean()), 1)}


def tone_share(ev, im, lb, x_train) -> dict:
    """The evaluator's FD / floor for the samples as they are, tone-matched (each value sent to the train value at
    the same quantile of all pixels: fixes brightness and contrast, keeps every shape) and with the haze cleared."""
    q = np.linspace(0, 1, 2001)
    g = im.astype(np.float64)
    matched = np.interp(g, np.quantile(g, q), np.quantile(x_train.astype(np.float64), q))
    ratio = lambda x: round(ev.evaluate(x, lb)["fd_ratio"], 3)
    return {"as_sampled": ratio(im), "tones_matched_to_train": ratio(u8(matched)),
            "grey_below_16_set_to_0": ratio(np.where(im < 16, 0, im).astype(np.uint8))}


def main(argv):
    kv = dict(a.split("=", 1) for a in argv if "=" in a)
    files = [a for a in argv if "=" not in a]
    d = kv.get("data_dir", "prepared/fashion_mnist")
    meta = load_meta(d)
    ev = get_evaluator(meta, d, lambda s: load_split(meta, d, s))
    xt, yt, rs = ev.x_test, ev.y_test, np.random.RandomState(0)
    perm = rs.permutation(len(yt))
    a_idx, b_idx = perm[:1000], perm[1000:2000]
    fa, xb = ev.f_test[a_idx], xt[b_idx].astype(np.float32)
    changes = {"real B (floor)": xt[b_idx], "blur 0.5 px": u8(nd.gaussian_filter(xb, (0, .5, .5, 0))),
               "blur 0.8 px": u8(nd.gaussian_filter(xb, (0, .8, .8, 0))),
               "noise sd 8": u8(xb + rs.normal(0, 8, xb.shape)),
               "brightness x1.1": u8(xb * 1.1), "gamma 0.8": u8(255 * (xb / 255) ** 0.8)}
    # What a random horizontal flip at training time teaches the model to produce: half of the images mirrored
    # (own RandomState, so the draws above and below stay those of the logged runs).
    mirror = np.random.RandomState(1).rand(len(b_idx)) < 0.5
    changes["half mirrored"] = np.where(mirror[:, None, None, None], xt[b_idx][:, :, ::-1], xt[b_idx])
    k = int(meta["num_classes"])
    # Does a class have a handedness? Share of its test images closer to the class mean than to the mirrored mean.
    facing = {}
    for c in range(k):
        xc = xt[yt == c].astype(np.float32)
        mu = xc.mean(0)
        facing[c] = round(float(np.mean((xc * mu).sum((1, 2, 3)) > (xc * mu[:, ::-1]).sum((1, 2, 3)))), 3)
    out = {"closer_to_class_mean_than_to_its_mirror": facing, "real_vs": {}}
    for name, x in changes.items():
        f, logits = _apply(ev.classifier, x)
        out["real_vs"][name] = {**parts(f, fa), "acc": float((logits.argmax(-1) == yt[b_idx]).mean())}
    x_train = load_split(meta, d, "train")[0] if files else None
    for path in files:
        z = np.load(path)
        im, lb = z["images"], z["labels"]
        fg, _ = _apply(ev.classifier, im)
        real = np.concatenate([rs.permutation(np.where(yt == c)[0])[:np.sum(lb == c)] for c in range(k)])
        out[path] = {**parts(fg, ev.f_test[real]),
                     "fd_per_class": [round(frechet_distance(fg[lb == c], ev.f_test[yt == c][:np.sum(lb == c)]), 1)
                                      for c in range(k)],
                     "pixel_mean_gen": [round(float(im[lb == c].mean()), 1) for c in range(k)],
                     "pixel_mean_real": [round(float(xt[yt == c].mean()), 1) for c in range(k)],
                     "spread_gen": [round(float(im[lb == c].mean((1, 2, 3)).std()), 1) for c in range(k)],
                     "spread_real": [round(float(xt[yt == c].mean((1, 2, 3)).std()), 1) for c in range(k)],
                     "pixels": {"generated": pixel_stats(im), "real_test": pixel_stats(xt[real])},
                     "fd_ratio": tone_share(ev, im, lb, x_train)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
