"""How well a trained stage-1 checkpoint denoises real test images at each time t, against the trivial estimate.

    python bench/denoise_error.py ckpt_dir=checkpoints/stage1 [step=N] [n=500] [seed=1]

For n real test images x (with their labels) and noise e: x_t = t x + (1 - t) e (training/flow.py), the EMA model's
clean-image estimate x_hat (flow.to_clean, for x- or v-prediction), and its RMSE in grey
levels (stored units) next to that of x_t / t, the estimate that needs no model. Near t = 1 the last sampling steps
hand over the model's x_hat as the image, so a model worse than x_t / t there returns a blurred image. Also the mean
error on background pixels (stored value 0). Prints JSON.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from data.loader import load_split  # noqa: E402
from data.meta import load_meta, to_model, to_stored  # noqa: E402
from models import build_model  # noqa: E402
from training import flow  # noqa: E402
from training.checkpoint import Checkpointer, read_config  # noqa: E402

TIMES = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


def main(argv):
    kv = dict(a.split("=", 1) for a in argv)
    ckpt, n, seed = kv["ckpt_dir"], int(kv.get("n", 500)), int(kv.get("seed", 1))
    saved, step = read_config(ckpt, int(kv["step"]) if "step" in kv else None)
    spec, train = saved["model_spec"], saved["train"]
    data_dir = Path(saved["data"]["root"]) / saved["data"]["name"]
    meta = load_meta(data_dir)
    x, y = load_split(meta, data_dir, "test")
    x, y = x[:n], jnp.asarray(y[:n], jnp.int32)
    xm, bg = jnp.asarray(to_model(x, meta)), x == 0
    with Checkpointer(ckpt, create=False) as ck:
        ema = ck.restore_weights(build_model(spec, key=jax.random.PRNGKey(0)), step)
    pred = train.get("prediction", "v")

    @jax.jit
    def x_hat(x_t, t):
        return flow.to_clean(jax.vmap(lambda xi, yi: ema(xi, t, yi))(x_t, y), x_t, t, pred)

    rows = []
    for i, t in enumerate(TIMES):
        e = jax.random.normal(jax.random.PRNGKey(seed + i), xm.shape)
        x_t = flow.interpolate(xm, e, jnp.full((n,), t))
        err = to_stored(np.asarray(x_hat(x_t, jnp.float32(t))), meta) - x.astype(np.float32)
        base = to_stored(np.asarray(x_t) / t, meta) - x.astype(np.float32)
        rows.append({"t": t, "rmse_model": round(float(np.sqrt(np.mean(err ** 2))), 2),
                     "rmse_x_t_over_t": round(float(np.sqrt(np.mean(base ** 2))), 2),
                     "background_mean_err": round(float(err[bg].mean()), 2) if bg.any() else None})
    print(json.dumps({"ckpt_dir": ckpt, "step": step, "prediction": pred, "n": n,
                      "time_sampling": [train.get("time_sampling"), train.get("time_mean"), train.get("time_std"),
                                        train.get("time_uniform_frac", 0.0)], "by_t": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
