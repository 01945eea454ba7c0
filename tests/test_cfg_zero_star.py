"""CFG-Zero* (Fan et al. 2025) in the sampler: sampler.opt_scale and sampler.zero_steps (training/sampling.py)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_sampling import GaussianShift, sampler_cfg, start_noise
from training.errors import UserError
from training.sampling import sample, time_grid


class NullTwiceAsLong(eqx.Module):
    """v = x for a class, 2 x for the null class 0: the two branches differ only in length."""

    def __call__(self, x, t, y):
        return x * jnp.where(y == 0, 2.0, 1.0).reshape(y.shape + (1,) * (x.ndim - 1))


def test_optimized_scale_guides_only_along_what_the_branches_disagree_on():
    key, labels = jax.random.PRNGKey(5), np.array([1, 2, 3], np.int32)
    run = lambda **kw: sample(NullTwiceAsLong(), labels, key, null_cond=0, shape=(2, 2, 1),
                              sampler_cfg=sampler_cfg(steps=8, **kw))
    conditional = run()
    np.testing.assert_allclose(run(cfg_scale=3.0, opt_scale=True), conditional, rtol=1e-5)   # scaled: no gap left
    assert np.abs(run(cfg_scale=3.0) - conditional).max() > 0.1   # plain guidance pushes along the length gap


@pytest.mark.parametrize("steps, shift, zero", [(2, 1.0, 1), (6, 3.0, 2)])
def test_zero_steps_start_the_solve_later_from_the_noise(steps, shift, zero):
    """CFG-Zero*'s zero-init: the first `zero` steps keep x0, the rest are Euler steps of the grid from x0."""
    key, labels = jax.random.PRNGKey(6), np.array([1, 2], np.int32)
    x = start_noise(key, 2, (2, 2, 1)).astype(np.float64)
    ts = time_grid(steps, shift)
    model = GaussianShift()
    for a, b in zip(ts[zero:-1], ts[zero + 1:]):
        x = x + (b - a) * np.asarray(model(jnp.asarray(x, jnp.float32), jnp.float32(a), jnp.asarray(labels)[:, None,
                                                                                                         None, None]))
    out = sample(model, labels, key, null_cond=99, shape=(2, 2, 1),
                 sampler_cfg=sampler_cfg(steps=steps, shift=shift, zero_steps=zero))
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
    full = sample(model, labels, key, null_cond=99, shape=(2, 2, 1), sampler_cfg=sampler_cfg(steps=steps, shift=shift))
    assert np.abs(full - out).max() > 0.1
    with pytest.raises(UserError, match=f"sampler.zero_steps={steps} zeroes every one of the {steps} steps"):
        sample(model, labels, key, null_cond=99, shape=(2, 2, 1),
               sampler_cfg=sampler_cfg(steps=steps, shift=shift, zero_steps=steps))
