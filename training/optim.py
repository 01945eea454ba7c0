"""Optimizer from config: global-norm clipping, then AdamW on a warm-up + cosine/constant learning-rate schedule."""

import jax
import optax


def lr_schedule(lr: float, steps: int, optim_cfg):
    warmup = min(int(optim_cfg.warmup_steps), max(steps - 1, 0))
    if optim_cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [warmup])
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                                  end_value=lr * float(optim_cfg.min_lr_ratio))
    raise ValueError(f"unknown schedule {optim_cfg.schedule!r} (cosine | constant)")


def decay_mask(params):
    """Weight decay on matrices only: biases, norm scales and the stacked-block vectors (ndim counts the depth
    axis, so we look at the trailing shape) are left alone, as is the class-embedding table."""
    def keep(path, a):
        name = jax.tree_util.keystr(path)
        return a.ndim >= 2 and a.shape[-1] > 1 and "embed" not in name.replace("patch_embed", "") and \
            not name.endswith("bias") and "scale" not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg, optim_cfg):
    schedule = lr_schedule(float(train_cfg.lr), int(train_cfg.steps), optim_cfg)
    opt = optax.chain(
        optax.clip_by_global_norm(float(optim_cfg.clip_norm)),
        optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                    weight_decay=float(optim_cfg.weight_decay), mask=decay_mask),
    )
    return opt, schedule
