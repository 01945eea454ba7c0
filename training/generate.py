"""Generate images from a model for grids, evaluation and sample.py (one code path for all three)."""

import numpy as np

from data.meta import to_uint8
from data.vae import decode_to_uint8, is_latent
from training.sampling import balanced_labels, sample


def generate(model, spec: dict, meta: dict, labels: np.ndarray, key, sampler_cfg, train_cfg) -> np.ndarray:
    """Images as uint8 (N, H, W, C) for the given labels; latent data sets are decoded by the VAE named in their
    meta.json (data/vae.py: torch, in chunks, on the CPU unless $DIT_VAE_DEVICE names another device)."""
    h, w = spec["input_size"]
    x = sample(model, labels, key, null_cond=spec["num_classes"], shape=(h, w, spec["in_channels"]),
               sampler_cfg=sampler_cfg, prediction=train_cfg.prediction, t_eps=float(train_cfg.t_eps),
               precision=train_cfg.precision)
    if is_latent(meta):
        return decode_to_uint8(np.asarray(x), meta, chunk=int(sampler_cfg.get("chunk", 64) or 64))
    return to_uint8(x, meta)


def grid_labels(num_classes: int, per_class: int = 8) -> np.ndarray:
    """Rows of one class each, for sample grids."""
    return balanced_labels(num_classes * per_class, num_classes)
