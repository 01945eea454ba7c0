import jax
import jax.numpy as jnp
import numpy as np

from training import flow


def test_interpolant_endpoints_and_velocity():
    x, eps = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
    np.testing.assert_allclose(flow.interpolate(x, eps, jnp.zeros(2)), eps)  # t = 0 is noise
    np.testing.assert_allclose(flow.interpolate(x, eps, jnp.ones(2)), x)     # t = 1 is data
    # v is the time derivative of x_t
    dt = 1e-3
    fd = (flow.interpolate(x, eps, jnp.full(2, 0.5 + dt)) - flow.interpolate(x, eps, jnp.full(2, 0.5))) / dt
    np.testing.assert_allclose(fd, flow.velocity_target(x, eps), rtol=1e-3)


def test_x_prediction_converts_to_the_true_velocity():
    key = jax.random.PRNGKey(0)
    x, eps = jax.random.normal(key, (4, 5)), jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    t = jnp.array([0.1, 0.4, 0.7, 0.9])
    x_t = flow.interpolate(x, eps, t)
    v = flow.to_velocity(x, x_t, t, "x", t_eps=0.05)  # a perfect x-predictor gives the exact velocity
    np.testing.assert_allclose(v, flow.velocity_target(x, eps), rtol=1e-4, atol=1e-5)
    assert np.isfinite(np.asarray(flow.to_velocity(x, x_t, jnp.ones(4), "x"))).all()  # t = 1 is clamped
    # and back: the clean estimate from a perfect velocity (v-prediction) or taken as is (x-prediction) is x
    np.testing.assert_allclose(flow.to_clean(flow.velocity_target(x, eps), x_t, t, "v"), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(flow.to_clean(x, x_t, t, "x"), x)


def test_time_samplers():
    u = flow.sample_t(jax.random.PRNGKey(0), 20000, "uniform")
    ln = flow.sample_t(jax.random.PRNGKey(0), 20000, "logit_normal", 0.0, 1.0)
    assert 0 <= float(u.min()) and float(u.max()) <= 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(jnp.median(ln)) - 0.5) < 0.01 and float(jnp.std(ln)) < float(jnp.std(u))
    shifted = flow.sample_t(jax.random.PRNGKey(0), 20000, "logit_normal", -0.8, 0.8)
    assert float(jnp.median(shifted)) < 0.4


def test_uniform_fraction_covers_times_near_the_data():
    key, n = jax.random.PRNGKey(0), 50000
    shifted = flow.sample_t(key, n, "logit_normal", -0.8, 0.8)
    # 0.0 is the plain logit-normal, draw for draw (runs saved before the key existed resume unchanged)
    np.testing.assert_array_equal(flow.sample_t(key, n, "logit_normal", -0.8, 0.8, uniform_frac=0.0), shifted)
    mixed = flow.sample_t(key, n, "logit_normal", -0.8, 0.8, uniform_frac=0.2)
    assert float(jnp.mean(shifted > 0.9)) < 1e-3            # the noise-heavy law leaves t -> 1 untrained
    assert abs(float(jnp.mean(mixed > 0.9)) - 0.2 * 0.1) < 0.004   # a fifth of the draws uniform: 2% above 0.9
    assert 0 <= float(mixed.min()) and float(mixed.max()) <= 1


def test_label_dropout_rate():
    y = jnp.zeros(50000, jnp.int32)
    dropped = flow.drop_labels(jax.random.PRNGKey(0), y, 0.1, 10)
    assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 0.01
    assert set(np.unique(np.asarray(dropped))) == {0, 10}


def test_guidance_scale_one_is_conditional():
    vc, vu = jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])
    np.testing.assert_allclose(flow.guided_velocity(vc, vu, 1.0), vc)
    np.testing.assert_allclose(flow.guided_velocity(vc, vu, 2.0), 2 * vc)
