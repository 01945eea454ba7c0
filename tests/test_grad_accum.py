"""Gradient accumulation: K micro-batches of B inside one jitted step equal one step on the batch of K x B."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import build_model, model_spec
from training.cli import compose
from training.optim import make_optimizer
from training.state import init_state, split_keys
from training.errors import UserError
from training.step import check_route, make_train_step

B, K, STEPS = 8, 4, 2


def _train(batch_size: int, accum: int, batches, extra=()):
    cfg = compose("config", ["model=tiny", "model.depth=2", "train.precision=float32", f"train.batch_size={batch_size}",
                             f"train.grad_accum={accum}", "optim.warmup_steps=1", "train.steps=10", *extra])
    spec = model_spec(cfg.model, {"shape": [8, 8, 4], "num_classes": 10})
    check_route(cfg.train, spec)   # as training.loop.run does before building the step
    model_key, train_key = split_keys(0)
    optimizer, schedule = make_optimizer(cfg.train, cfg.optim)
    state = init_state(build_model(spec, key=model_key), optimizer, train_key)
    step = make_train_step(cfg.train, optimizer, schedule, 10)
    losses = []
    for b in batches:
        state, m = step(state, jax.tree.map(jnp.asarray, b))
        losses.append(float(m["loss"]))
    return state, losses


def _leaves(state):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


# Routed: 5 steps, because the zero-initialised output layer and adaLN-Zero gates make the blocks (and so the route)
# matter only from step 3 on; the kept tokens are drawn for the whole batch and split with it.
@pytest.mark.parametrize("extra,steps", [((), STEPS), (("train.route=[0,2,0.5]",), 5)], ids=["dense", "routed"])
def test_accumulated_step_equals_the_big_batch_step(extra, steps):
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((B * K, 8, 8, 4)).astype(np.float32),
                "label": rng.integers(0, 10, B * K).astype(np.int32)} for _ in range(steps)]
    big, big_losses = _train(B * K, 1, batches, extra)
    acc, acc_losses = _train(B, K, batches, extra)
    np.testing.assert_allclose(acc_losses, big_losses, atol=1e-5, rtol=0)
    diffs = [np.max(np.abs(a - b)) for a, b in zip(_leaves(acc), _leaves(big), strict=True) if a.size]
    assert max(diffs) < 1e-5, max(diffs)
    assert int(acc.step) == steps
    # the steps really trained (so equality is not that of two no-ops)
    fresh, _ = _train(B * K, 1, [])
    assert max(np.max(np.abs(a - b)) for a, b in zip(_leaves(big), _leaves(fresh)) if a.size) > 1e-4


def test_ema_follows_its_warm_up_schedule():
    """EMA after each step = d * EMA + (1 - d) * new params with d = min(ema_decay, (1 + step) / (offset + step))."""
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((B, 8, 8, 4)).astype(np.float32),
                "label": rng.integers(0, 10, B).astype(np.int32)} for _ in range(3)]
    for offset in (10, 4):
        cfg = compose("config", ["model=tiny", "model.depth=2", "optim.warmup_steps=1", "train.steps=10",
                                 f"train.ema_warmup_offset={offset}"])
        spec = model_spec(cfg.model, {"shape": [8, 8, 4], "num_classes": 10})
        model_key, train_key = split_keys(0)
        optimizer, schedule = make_optimizer(cfg.train, cfg.optim)
        state = init_state(build_model(spec, key=model_key), optimizer, train_key)
        step_fn = make_train_step(cfg.train, optimizer, schedule, 10)
        ema = _leaves(state.ema)
        for i, b in enumerate(batches):
            state, _ = step_fn(state, jax.tree.map(jnp.asarray, b))
            d = min(0.999, (1 + i) / (offset + i))
            ema = [d * e + (1 - d) * p for e, p in zip(ema, _leaves(state.params))]
            np.testing.assert_allclose(np.concatenate([a.ravel() for a in _leaves(state.ema)]),
                                       np.concatenate([a.ravel() for a in ema]), atol=1e-6)


def test_token_routing_in_the_step():
    """train.route: keeping every token is the unrouted step; keeping half changes the loss, deterministically,
    and a route the model cannot take is one user error."""
    rng = np.random.default_rng(2)
    batch = {"x": rng.standard_normal((B, 8, 8, 4)).astype(np.float32),
             "label": rng.integers(0, 10, B).astype(np.int32)}

    def loss_with(route):   # 5 steps: zero-init output, then adaLN-Zero: the blocks act from step 3 on
        return _train(B, 1, [batch] * 5, (f"train.route={route}",))[1]

    plain = loss_with("null")
    assert loss_with("[0,2,1.0]") == pytest.approx(plain, rel=1e-6, abs=0)
    half = loss_with("[0,2,0.5]")
    assert abs(half[4] - plain[4]) > 1e-4, (half, plain)
    assert loss_with("[0,2,0.5]") == half
    for bad in ("[1,3,0.5]", "[1,1,0.5]", "[0,2,0]", "[0,2]"):
        with pytest.raises(UserError, match="train.route"):
            loss_with(bad)
