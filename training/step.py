"""The pure, jitted train step: loss, gradient (with accumulation), clipping + AdamW, EMA, non-finite guard.

All randomness (time, noise, label dropout) is drawn inside the step from fold_in(state.key, state.step): no host
work per step, and a resumed run draws exactly what the uninterrupted one would have.
"""

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from models import apply
from models.dit import route_keep
from training import flow, sharding
from training.errors import UserError
from training.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floats(tree, dtype):
    """Cast every floating array of a pytree (model weights) to the compute dtype."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def class_conditioning(key, batch, p: float, null_class: int):
    """Stage 1: per-example conditioning arguments of the model after CFG label dropout."""
    return (flow.drop_labels(key, batch["label"], p, null_class),)


def text_conditioning(key, batch, p: float, null_cond=None):
    """Stage 2: (caption states, mask, drop); the model swaps in its learned null caption where drop is true. The
    states come as stored (float16) and are widened here, on the device: exactly, as on the host before, with half
    the bytes through the loader and the host-to-device copy (T5's 120 x 4096 per caption: 0.94 MiB)."""
    return batch["text"].astype(jnp.float32), batch["mask"], jax.random.bernoulli(key, p, batch["mask"].shape[:1])


def check_route(train_cfg, spec: dict) -> None:
    """train.route = [start, end, keep] (TREAD token routing) fails at start with one line if it cannot apply."""
    r = train_cfg.get("route", None)
    if r is None:
        return
    if spec.get("mixing") is not None:
        raise UserError("train.route (token routing) is built for the class-conditional DiT only: set train.route=null")
    try:
        start, end, keep = int(r[0]), int(r[1]), float(r[2])
        ok = len(r) == 3 and 0 <= start < end <= int(spec["depth"]) and 0.0 < keep <= 1.0
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise UserError(f"train.route={list(r) if not isinstance(r, str) else r} is not [start, end, keep] with "
                        f"0 <= start < end <= model.depth ({spec['depth']}) and 0 < keep <= 1, e.g. "
                        "'train.route=[1,5,0.5]' (or null)")


def make_train_step(train_cfg, optimizer, schedule, null_cond: int,
                    conditioning: Callable = class_conditioning, mesh=None):
    """Build `train_step(state, batch) -> (state, metrics)`; batch leading axis = batch_size * grad_accum.

    With a `mesh` (training.sharding), the new state keeps the rule shardings (params, optimizer state and EMA over
    fsdp) and the micro-batches stay split over all devices; without one, XLA places everything as it likes."""
    compute_dtype = DTYPES[train_cfg.precision]
    accum = int(train_cfg.grad_accum)
    pred, t_eps = str(train_cfg.prediction), float(train_cfg.t_eps)
    w_max = train_cfg.get("loss_weight_max", None)
    ema_decay, ema_warmup = float(train_cfg.ema_decay), bool(train_cfg.ema_warmup)
    ema_offset = float(train_cfg.get("ema_warmup_offset", 10))
    route_cfg = train_cfg.get("route", None)   # [start, end, keep_fraction]: TREAD token routing, or null

    def micro_loss(model, x_t, t, v, cond, keep=None):
        m = cast_floats(model, compute_dtype)  # fp32 master -> compute dtype inside the graph: fp32 gradients
        route = None if keep is None else (int(route_cfg[0]), int(route_cfg[1]), keep)
        out = apply(m, x_t.astype(compute_dtype), t, *cond, route=route).astype(jnp.float32)
        v_hat = flow.to_velocity(out, x_t, t, pred, t_eps)
        if w_max is None:
            return jnp.mean(jnp.square(v_hat - v))
        w = flow.cap_loss_weight(t, float(w_max), t_eps)
        return jnp.mean(w.reshape(w.shape + (1,) * (v.ndim - 1)) * jnp.square(v_hat - v))

    grad_fn = eqx.filter_value_and_grad(micro_loss)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        k_t, k_e, k_c = jax.random.split(key, 3)
        x = batch["x"].astype(jnp.float32)
        n = x.shape[0]
        # Randomness for the whole (accumulated) batch at once: accumulation equals one large batch exactly.
        t = flow.sample_t(k_t, n, train_cfg.time_sampling, train_cfg.time_mean, train_cfg.time_std,
                           float(train_cfg.get("time_uniform_frac", 0.0)),
                           bool(train_cfg.get("time_stratified", False)))
        eps = jax.random.normal(k_e, x.shape, jnp.float32)
        x_t, v = flow.interpolate(x, eps, t), flow.velocity_target(x, eps)
        cond = conditioning(k_c, batch, float(train_cfg.cfg_p), null_cond)
        keep = None
        if route_cfg is not None:   # per example, a random subset of the tokens goes through the routed blocks
            keep = route_keep(jax.random.fold_in(key, 7), n, state.params.num_tokens, float(route_cfg[2]))
        if accum == 1:
            loss, grads = grad_fn(state.params, x_t, t, v, cond, keep)
        else:
            # Strided split (micro-batch j = rows j, j + K, ...): each device's contiguous block of the sharded
            # batch contributes equally to every micro-batch, so splitting moves no data between devices.
            split = lambda a: jnp.swapaxes(a.reshape((n // accum, accum) + a.shape[1:]), 0, 1)
            micro = sharding.constrain_batch(jax.tree.map(split, (x_t, t, v, cond, keep)), mesh, axis=1)
            zeros = jax.tree.map(jnp.zeros_like, eqx.filter(state.params, eqx.is_inexact_array))

            def body(carry, mb):
                l, g = grad_fn(state.params, *mb)
                return jax.tree.map(jnp.add, carry, (l, g)), None

            loss, grads = jax.lax.scan(body, (jnp.zeros(()), zeros), micro)[0]
            loss, grads = jax.tree.map(lambda a: a / accum, (loss, grads))
        grads = sharding.constrain(grads, mesh)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        params_f = eqx.filter(state.params, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params_f)
        params = eqx.apply_updates(state.params, updates)
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (ema_offset + step)) if ema_warmup else jnp.float32(ema_decay)
        ema = jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), eqx.filter(state.ema, eqx.is_inexact_array),
                           eqx.filter(params, eqx.is_inexact_array))
        ema = eqx.combine(ema, state.ema)
        # Non-finite loss or gradient: keep params, optimizer state and EMA as they were; count it.
        good = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(good, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            ema=keep(ema, state.ema), key=state.key,
            bad_steps=jnp.where(good, 0, state.bad_steps + 1), skipped=state.skipped + (~good).astype(jnp.int32))
        new_state = sharding.constrain(new_state, mesh)
        # The lr this update used: the optimizer's schedule runs on its own count, which skipped steps do not advance
        # (their optimizer state is kept), so it is state.step - state.skipped, not state.step.
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped),
                   "skipped": (~good).astype(jnp.int32)}
        return new_state, metrics

    return eqx.filter_jit(train_step, donate="all")
