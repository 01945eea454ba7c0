"""Peak host memory of `training.generate.generate` for a large request, as sample.py makes it. Prints JSON.

    python bench/sample_memory.py [n=4000] [size=64] [chunk=500]

A random tiny DiT (one block, patch 16) on size x size x 3 uint8 pixels, one Euler step: the model is not the point,
the arrays around it are. tracemalloc counts NumPy's allocations (it reports them to Python's tracer), so
`traced_peak_mib` is what the host side held at most, next to the size of the result (`images_mib`).
"""

import json
import sys
import tracemalloc
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import build_model, model_spec  # noqa: E402
from training.cli import compose  # noqa: E402
from training.generate import generate  # noqa: E402


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    n, size, chunk = int(args.get("n", 4000)), int(args.get("size", 64)), int(args.get("chunk", 500))
    cfg = compose("config", ["model=tiny", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                             "model.patch_size=16", "sampler.steps=1", f"sampler.chunk={chunk}",
                             "sampler.guidance=cfg"])
    meta = {"name": "synthetic", "shape": [size, size, 3], "num_classes": 10, "dtype": "uint8",
            "shift": [127.5] * 3, "scale": [1 / 127.5] * 3}
    spec = model_spec(cfg.model, meta)
    model = build_model(spec, key=jax.random.PRNGKey(0))
    labels = np.arange(n) % 10
    tracemalloc.start()
    images = generate(model, spec, meta, labels, jax.random.PRNGKey(1), cfg.sampler, cfg.train)
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"n": n, "shape": list(images.shape[1:]), "chunk": chunk,
                      "images_mib": round(images.nbytes / 2**20, 1),
                      "float32_result_mib": round(4 * images.nbytes / 2**20, 1),
                      "traced_peak_mib": round(peak / 2**20, 1)}))


if __name__ == "__main__":
    main(sys.argv[1:])
