"""How far a seed's images move with sampler.chunk, per solver: the same request (7 images, tiny preset with every
weight shifted by 0.02 so the ODE is not trivial, guidance 1.5) sampled at chunk 7 and at chunks 3, 2 and 1.

    python bench/sampler_chunks.py [tols=1e-4,1e-5,1e-6] [steps=64]

Each image's noise comes from (seed, its index) (training/sampling.py), so fixed-step solvers differ only by float
rounding of the batched math. An adaptive solver (tsit5) follows each image's own error, but rounding can flip a
step's acceptance, and this random model's ODE amplifies that: the difference falls with rtol to a floor. Prints JSON:
the largest absolute difference from chunk 7, per chunk, and the seconds each setting took.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from models import build_model, model_spec  # noqa: E402
from training.cli import compose  # noqa: E402
from training.sampling import balanced_labels, sample  # noqa: E402


def main(args):
    spec = model_spec(compose("config", ["model=tiny"]).model, {"shape": [8, 8, 1], "num_classes": 10})
    model = jax.tree.map(lambda a: a + 0.02, build_model(spec, key=jax.random.PRNGKey(0)))
    labels, steps = balanced_labels(7, 10), int(args.get("steps", 64))

    def run(chunk, **kw):
        cfg = OmegaConf.create({"solver": "euler", "steps": steps, "rtol": 1e-5, "atol": 1e-5, "cfg_scale": 1.5,
                                "chunk": chunk, **kw})
        return sample(model, labels, jax.random.PRNGKey(0), null_cond=10, shape=(8, 8, 1), sampler_cfg=cfg)

    settings = [("euler", {})] + [(f"tsit5 rtol=atol={t}", {"solver": "tsit5", "rtol": float(t), "atol": float(t)})
                                  for t in args.get("tols", "1e-4,1e-5,1e-6").split(",")]
    out = []
    for name, kw in settings:
        t0 = time.perf_counter()
        whole = run(7, **kw)
        diff = {f"chunk {c}": float(np.abs(run(c, **kw) - whole).max()) for c in (3, 2, 1)}
        out.append({"solver": name, "max_abs_diff_vs_chunk_7": diff, "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps({"bench": "sampler_chunks", "steps": steps, "runs": out}, indent=1))


if __name__ == "__main__":
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
