"""Post-hoc averages of a run's saved weights, scored like `sample.py ... evaluate=true`. Prints JSON.

    python bench/ema_average.py ckpt_dir=/tmp/runs/base strong=1300,1400,1500,1600 seed=2
    python bench/ema_average.py ckpt_dir=/tmp/runs/base strong=1600 raw=0.3 seed=2     # 0.7 x EMA + 0.3 x raw weights
    python bench/ema_average.py ckpt_dir=/tmp/runs/base weak=700,800,900 seed=2        # a smoother weak model

The strong model is the mean of the EMAs saved at the `strong` steps (default: the latest), blended with weight `raw`
with the raw weights of the last of them; the weak model (autoguidance) is the mean of the EMAs at the `weak` steps
(default: the run's own weak step). Everything else is the run's saved sampler, 1000 class-balanced samples
(`num=`), the project's classifier. Train with `train.ckpt_every=100 train.keep_ckpts=20` to have steps to average.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from data.loader import load_split  # noqa: E402
from data.meta import load_meta  # noqa: E402
from models import build_model  # noqa: E402
from training.checkpoint import Checkpointer, read_config  # noqa: E402
from training.evaluate import get_evaluator  # noqa: E402
from training.generate import generate, guide_step  # noqa: E402
from training.sampling import balanced_labels  # noqa: E402


def mean_of(ckpt: Checkpointer, template, steps, item="ema"):
    arrays = [eqx.filter(ckpt.restore_weights(template, s, item=item), eqx.is_array) for s in steps]
    return jax.tree.map(lambda *a: sum(a) / len(a), *arrays)


def main(argv):
    a = dict(s.split("=", 1) for s in argv)
    steps = lambda key: [int(s) for s in a[key].split(",")] if a.get(key) else None
    saved, latest = read_config(a["ckpt_dir"], None)
    run = OmegaConf.create(saved)
    spec, data_dir = saved["model_spec"], ROOT / run.data.root / run.data.name
    meta, template = load_meta(data_dir), build_model(spec, key=jax.random.PRNGKey(0))
    strong = steps("strong") or [latest]
    g = guide_step(run.sampler, run.train)   # None: the run's sampler does not autoguide
    weak = steps("weak") or ([g] if g is not None else [])
    raw = float(a.get("raw", 0))
    with Checkpointer(a["ckpt_dir"], create=False) as ckpt:
        w = mean_of(ckpt, template, strong)
        if raw:
            w = jax.tree.map(lambda e, p: (1 - raw) * e + raw * p, w, mean_of(ckpt, template, strong[-1:], "params"))
        w_weak = mean_of(ckpt, template, weak) if weak else None
    static = eqx.filter(template, eqx.is_array, inverse=True)
    labels = balanced_labels(int(a.get("num", 1000)), spec["num_classes"])
    images = generate(eqx.combine(w, static), spec, meta, labels, jax.random.PRNGKey(int(a.get("seed", 0))),
                      run.sampler, run.train, weak=None if w_weak is None else eqx.combine(w_weak, static))
    res = get_evaluator(meta, data_dir, lambda split: load_split(meta, data_dir, split)).evaluate(images, labels)
    print(json.dumps({"strong": strong, "raw": raw, "weak": weak, "acc_ratio": round(float(res["acc_ratio"]), 3),
                      "fd_ratio": round(float(res["fd_ratio"]), 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])
