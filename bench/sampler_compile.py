"""What a sampling request costs the first time and when repeated in the same process: the first call compiles the
chunk sampler, a repeat with the same settings reuses it (training.sampling._chunk_sampler).

    python bench/sampler_compile.py [presets=tiny,small] [n=80,256] [guidance=cfg,auto]

The shipped sampler config (32 Euler steps, x-prediction, cfg 1.25; autoguidance uses the model itself as the weak one:
the cost, not the images, is measured) on each preset with every weight shifted by 0.02. Shapes: tiny 8x8x1 (digits),
small 28x28x1 (Fashion-MNIST). Prints JSON: seconds of the first and the second identical call, per setting; their
difference is the compile.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from models import build_model, model_spec  # noqa: E402
from training.cli import compose  # noqa: E402
from training.sampling import balanced_labels, sample  # noqa: E402

SHAPES = {"tiny": (8, 8, 1), "small": (28, 28, 1)}


def main(args):
    runs = []
    for preset in args.get("presets", "tiny,small").split(","):
        cfg = compose("config", [f"model={preset}"])
        shape = SHAPES[preset]
        spec = model_spec(cfg.model, {"shape": list(shape), "num_classes": 10})
        model = jax.tree.map(lambda a: a + 0.02, build_model(spec, key=jax.random.PRNGKey(0)))
        for n in (int(x) for x in args.get("n", "80,256").split(",")):
            for guidance in args.get("guidance", "cfg,auto").split(","):
                sampler = cfg.sampler.copy()
                sampler.guidance = guidance
                seconds = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    sample(model, balanced_labels(n, 10), jax.random.PRNGKey(0), null_cond=10, shape=shape,
                           sampler_cfg=sampler, prediction="x", weak=model if guidance == "auto" else None)
                    seconds.append(round(time.perf_counter() - t0, 2))
                runs.append({"preset": preset, "n": n, "guidance": guidance, "first_s": seconds[0],
                             "second_s": seconds[1]})
    print(json.dumps({"bench": "sampler_compile", "runs": runs}, indent=1))


if __name__ == "__main__":
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
