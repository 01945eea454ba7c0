"""The train state: everything a run needs to continue bit-for-bit, as one pytree."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array


class TrainState(eqx.Module):
    step: Array        # int32 (): optimizer steps taken so far
    params: eqx.Module  # float32 master weights (the full model: arrays + static structure)
    opt_state: optax.OptState
    ema: eqx.Module    # exponential moving average of params, same structure, used for sampling
    key: Array         # uint32 (2,): base PRNG key; step i uses fold_in(key, i), so resume replays nothing
    bad_steps: Array   # int32 (): consecutive steps skipped for a non-finite loss or gradient
    skipped: Array     # int32 (): total skipped steps


def init_state(model: eqx.Module, optimizer: optax.GradientTransformation, train_key) -> TrainState:
    params = eqx.filter(model, eqx.is_inexact_array)
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the step donates every leaf
    # The EMA starts as a copy of the initial weights (not zeros, which would bias early samples to zero).
    return TrainState(step=zero(), params=model, opt_state=optimizer.init(params),
                      ema=jax.tree.map(jnp.copy, model), key=jnp.asarray(train_key, jnp.uint32),
                      bad_steps=zero(), skipped=zero())


def split_keys(seed: int):
    """One seed -> independent keys for model init and training randomness."""
    model_key, train_key = jax.random.split(jax.random.PRNGKey(int(seed)))
    return model_key, train_key
