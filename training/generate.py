"""Generate images from a model for grids, evaluation and sample.py (one code path for all three)."""

import numpy as np

from data.meta import to_uint8
from data.vae import decode_to_uint8, is_latent
from training.sampling import balanced_labels, sample


def generate(model, spec: dict, meta: dict, labels: np.ndarray, key, sampler_cfg, train_cfg) -> np.ndarray:
    """Images as uint8 (N, H, W, C) for the given labels; latent data sets are decoded by the VAE named in their
    meta.json (data/vae.py: torch, in chunks, on the CPU unless $DIT_VAE_DEVICE names another device)."""
    h, w = spec["input_size"]
    null = text_null if spec.get("mixing") else spec["num_classes"]  # stage 2: labels = text_conds(...)
    x = sample(model, labels, key, null_cond=null, shape=(h, w, spec["in_channels"]),
               sampler_cfg=sampler_cfg, prediction=train_cfg.prediction, t_eps=float(train_cfg.t_eps),
               precision=train_cfg.precision)
    if is_latent(meta):
        return decode_to_uint8(np.asarray(x), meta, chunk=int(sampler_cfg.get("chunk", 64) or 64))
    return to_uint8(x, meta)


def grid_labels(num_classes: int, per_class: int = 8) -> np.ndarray:
    """Rows of one class each, for sample grids."""
    return balanced_labels(num_classes * per_class, num_classes)


def text_conds(text: np.ndarray, mask: np.ndarray) -> tuple:
    """Stage-2 per-example conditions for `generate`/`sample`: caption states (N,T,E), mask (N,T), drop=False."""
    return (np.asarray(text, np.float32), np.asarray(mask, bool), np.zeros(len(text), bool))


def text_null(cond: tuple) -> tuple:
    """The null condition of a stage-2 batch: same arrays, drop=True (the model swaps in its learned null caption)."""
    import jax.numpy as jnp

    text, mask, drop = cond
    return text, mask, jnp.ones_like(drop)
