"""Optimizer from config: global-norm clipping, then AdamW or Muon on a warm-up + cosine/WSD/constant schedule.

`optim=muon` (stage 1's default) or `optim=adamw` (stage 2's) (configs/optim/). Muon (Jordan et al. 2024;
optax.contrib.muon) replaces the Adam update of the transformer blocks' weight matrices by the orthogonalised
(Newton-Schulz) momentum; every other parameter (embeddings, the patch and output layers, biases, norm scales) keeps
Adam (optax's Muon uses Nesterov's), as Muon's authors advise.
Its updates are rescaled to AdamW's typical RMS (`consistent_rms`, Liu et al. 2025), so `train.lr` means about the same
step size for both.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, muon

from training.errors import UserError, check_whole
from training.newton_schulz import gram_muon

OPTIMIZERS = ("adamw", "muon")


def lr_schedule(lr: float, steps: int, optim_cfg):
    """Linear warm-up over optim.warmup_steps (capped below train.steps) from 0 to `lr`, then one of
    - cosine: cosine decay to min_lr_ratio x lr at train.steps;
    - wsd (warm-up, stable, decay; Hagele et al. 2024): `lr` until the last optim.decay_frac of train.steps, then down
      to min_lr_ratio x lr at train.steps along 1 - sqrt(progress) (that paper's best cool-down shape);
    - constant.
    warmup_steps=0: no warm-up, `lr` (cosine: the top of the cosine) from step 0; warmup_steps > 0 keeps exactly the
    schedule it always had."""
    warmup = min(check_whole("optim.warmup_steps", optim_cfg.warmup_steps, 0, "0: no warm-up"), max(steps - 1, 0))
    if optim_cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [warmup])
    if optim_cfg.schedule == "cosine":
        if warmup == 0:   # optax's warm-up schedule would still spend step 0 at lr 0 (a one-step ramp)
            return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=float(optim_cfg.min_lr_ratio))
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                  end_value=lr * float(optim_cfg.min_lr_ratio))
    if optim_cfg.schedule == "wsd":
        low = lr * float(optim_cfg.min_lr_ratio)
        start = max(warmup, int(round(steps * (1.0 - float(optim_cfg.decay_frac)))))
        length = max(steps - start, 1)

        def wsd(count):
            ramp = lr * count / max(warmup, 1)
            done = jnp.clip((count - start) / length, 0.0, 1.0)
            return jnp.where(count < warmup, ramp, low + (lr - low) * (1.0 - jnp.sqrt(done)))
        return wsd
    raise UserError(f"unknown optim.schedule {optim_cfg.schedule!r}: use cosine, wsd or constant")


def decay_mask(params):
    """Weight decay on matrices only: biases, norm scales, the class-embedding table and the learned null caption
    are left alone. The transformer blocks are stacked (every leaf under `.blocks.` has a leading depth axis), so a
    matrix there has ndim >= 3: the per-block vectors (biases, adaLN-single's tables `table` / `txt_table`, the joint
    blocks' `txt_gain`) are (depth, k) and are not decayed."""
    def keep(path, a):
        name = jax.tree_util.keystr(path)
        matrix_ndim = 3 if ".blocks." in name else 2
        return a.ndim >= matrix_ndim and a.shape[-1] > 1 and "embed" not in name.replace("patch_embed", "") and \
            not name.endswith("bias") and "scale" not in name and not name.endswith("null_text")
    return jax.tree_util.tree_map_with_path(keep, params)


def muon_dims(params, modulation: bool = True):
    """Which parameters Muon orthogonalises, and along which axes: the weights of the stacked blocks (depth, in, out),
    each block's matrix on its own (the depth axis is a batch axis); with modulation=False not the adaLN maps
    (`.ada`, a third of the Newton-Schulz work on the small preset). None: Adam."""
    def dims(path, a):
        name = jax.tree_util.keystr(path)
        if ".blocks." in name and name.endswith(".weight") and a.ndim == 3 and (modulation or ".ada." not in name):
            return MuonDimensionNumbers(reduction_axis=1, output_axis=2)
        return None
    return jax.tree_util.tree_map_with_path(dims, params)


def _layout(optim_cfg) -> tuple[str, bool]:
    """(optimizer name, Muon on the adaLN maps): what shapes the optimizer state. Configs saved before these keys
    existed are AdamW runs / Muon with the maps included."""
    return str(optim_cfg.get("name", "adamw")), bool(optim_cfg.get("muon_modulation", True))


def _adam_decay(optim_cfg) -> str:
    """Under Muon, which Adam-handled parameters weight decay reaches: `all` (optax's muon decays its Adam branch
    without a mask: biases, norm scales and embeddings too) or `matrices` (decay_mask, as AdamW)."""
    mode = str(optim_cfg.get("muon_adam_decay", "all"))   # runs saved before the key: all
    if mode not in ("all", "matrices"):
        raise UserError(f"unknown optim.muon_adam_decay {mode!r}: use all or matrices")
    return mode


def state_layout(optim_cfg) -> str:
    """The optimizer settings a resume must keep, as overrides ('optim=adamw', 'optim=muon optim.muon_modulation=.')."""
    name, modulation = _layout(optim_cfg)
    if name != "muon":
        return f"optim={name}"
    extra = " optim.muon_adam_decay=matrices" if _adam_decay(optim_cfg) == "matrices" else ""   # one more state
    return f"optim=muon optim.muon_modulation={str(modulation).lower()}{extra}"


class _DecayState(NamedTuple):
    count: jax.Array


def decoupled_decay(schedule, weight_decay: float, mask_fn) -> optax.GradientTransformation:
    """Adds -lr(step) x weight_decay x param to the final update of the leaves mask_fn(params) selects: AdamW's
    decoupled decay, for parameters whose optimizer applied none."""
    def init(params):
        return _DecayState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        lr = schedule(state.count)
        updates = jax.tree.map(lambda u, p, m: u - lr * weight_decay * p if m else u, updates, params,
                               mask_fn(params))
        return updates, _DecayState(count=optax.safe_increment(state.count))
    return optax.GradientTransformation(init, update)


def adam_matrices(params, modulation: bool = True):
    """decay_mask's matrices that Muon leaves to Adam (patch embedding, timestep MLP, output layers ...)."""
    return jax.tree.map(lambda m, d: bool(m) and d is None, decay_mask(params), muon_dims(params, modulation))


def make_optimizer(train_cfg, optim_cfg):
    schedule = lr_schedule(float(train_cfg.lr), int(train_cfg.steps), optim_cfg)
    name, modulation = _layout(optim_cfg)
    if name == "adamw":
        update = optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                             weight_decay=float(optim_cfg.weight_decay), mask=decay_mask)
    elif name == "muon":
        ratio, adam_decay = float(optim_cfg.muon_lr_ratio), _adam_decay(optim_cfg)
        muon_tx = muon(lambda s: ratio * schedule(s), beta=float(optim_cfg.muon_beta),
                       ns_steps=int(optim_cfg.muon_ns_steps), weight_decay=float(optim_cfg.weight_decay),
                       weight_decay_mask=decay_mask, adam_learning_rate=schedule, adam_b1=float(optim_cfg.b1),
                       adam_b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                       adam_weight_decay=float(optim_cfg.weight_decay) if adam_decay == "all" else 0.0,
                       consistent_rms=0.2, muon_weight_dimension_numbers=lambda p: muon_dims(p, modulation))
        update = gram_muon(muon_tx)   # the same Muon, its Newton-Schulz in fewer flops (training/newton_schulz.py)
        if adam_decay == "matrices":
            update = optax.chain(update, decoupled_decay(schedule, float(optim_cfg.weight_decay),
                                                         lambda p: adam_matrices(p, modulation)))
    else:
        raise UserError(f"unknown optim.name {name!r}: use optim=adamw or optim=muon ({' | '.join(OPTIMIZERS)})")
    return optax.chain(optax.clip_by_global_norm(float(optim_cfg.clip_norm)), update), schedule
