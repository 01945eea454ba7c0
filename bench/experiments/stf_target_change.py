"""How much a stable target field (Xu et al. 2023) changes the flow-matching target on a prepared set. Prints JSON.

    python bench/experiments/stf_target_change.py data_dir=prepared/fashion_mnist refs=2048,8192

For each reference size R and time t: 256 training images x, noise e, x_t = t x + (1 - t) e; the target's clean image
becomes the self-normalised average of R random training images of x's class (x itself included) weighted by
N(x_t; t x_i, (1 - t)^2 I). Reports the own image's mean weight, the effective number of images behind a target,
|v|^2 and |v_stf - v|^2 per image (development_log.md, forty-fifth session). The training runs of that entry apply
stable_target_field.patch (DIT_STF=R, DIT_STF_DIR=<prepared set>) or progressive_resolution.patch (DIT_LOWRES=K) in
a scratch clone: `git apply bench/experiments/<name>.patch`; neither is part of the project.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.loader import load_split  # noqa: E402
from data.meta import load_meta, to_model  # noqa: E402


def main(argv):
    kv = dict(a.split("=", 1) for a in argv)
    d = kv.get("data_dir", "prepared/fashion_mnist")
    refs = [int(r) for r in kv.get("refs", "2048,8192").split(",")]
    meta = load_meta(d)
    rx, y_all = load_split(meta, d, "train")
    x_all = to_model(rx, meta).reshape(len(rx), -1).astype(np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for r in refs:
        for t in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
            i = rng.integers(0, len(x_all), 256)
            x, y = x_all[i], y_all[i]
            e = rng.standard_normal(x.shape).astype(np.float32)
            xt = t * x + (1 - t) * e
            j = rng.integers(0, len(x_all), r)
            ref, yr = x_all[j], y_all[j]
            den = 2 * (1 - t) ** 2   # log N(x_t; t x_i, (1-t)^2) up to a per-row constant
            s = (2 * t * xt @ ref.T - t * t * (ref ** 2).sum(1)[None]) / den
            own = ((2 * t * (xt * x).sum(1) - t * t * (x ** 2).sum(1)) / den)[:, None]
            s = np.where(y[:, None] == yr[None], s, -np.inf)
            logits = np.concatenate([own, s], 1)
            w = np.exp(logits - logits.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            xbar = w[:, :1] * x + w[:, 1:] @ ref
            v = x - e
            change = (xbar - x) / (1 - t)
            rows.append({"refs": r, "t": t, "own_weight": float(w[:, 0].mean()),
                         "effective_images": float((1 / (w ** 2).sum(1)).mean()),
                         "v_sq": float((v ** 2).sum(1).mean()), "change_sq": float((change ** 2).sum(1).mean())})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
