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


def test_stratified_times_put_one_draw_in_each_stratum():
    key, n = jax.random.PRNGKey(3), 256
    u = np.asarray(flow.sample_t(key, n, "uniform", stratified=True))
    np.testing.assert_array_equal(np.sort(np.floor(u * n)), np.arange(n))   # exactly one draw per 1/n of [0, 1]
    assert np.corrcoef(np.floor(u * n), np.arange(n))[0, 1] < 0.5           # in random order, not sorted
    # logit-normal: the same law (its quantile function of the same stratified u), with a batch mean that barely moves
    t = np.asarray(flow.sample_t(key, n, "logit_normal", -0.8, 0.8, stratified=True), np.float64)
    np.testing.assert_allclose(jax.scipy.stats.norm.cdf((np.log(t / (1 - t)) + 0.8) / 0.8), u, atol=1e-4)
    means = lambda s: np.std([float(flow.sample_t(jax.random.PRNGKey(i), n, "logit_normal", -0.8, 0.8,
                                                  stratified=s).mean()) for i in range(20)])
    assert means(True) < means(False) / 5
    # off, the draws are the plain ones (runs saved before the key existed resume unchanged)
    np.testing.assert_array_equal(flow.sample_t(key, n, "logit_normal", -0.8, 0.8, stratified=False),
                                  flow.sample_t(key, n, "logit_normal", -0.8, 0.8))


def test_capped_loss_weight_bounds_the_clean_image_weight():
    key = jax.random.PRNGKey(0)
    x, eps, x_hat = (jax.random.normal(k, (4, 3)) for k in jax.random.split(key, 3))
    t = jnp.array([0.2, 0.6, 0.9, 0.97])
    x_t = flow.interpolate(x, eps, t)
    err_v = jnp.square(flow.to_velocity(x_hat, x_t, t, "x", t_eps=0.01) - flow.velocity_target(x, eps))
    w = flow.cap_loss_weight(t, 25.0, t_eps=0.01)
    np.testing.assert_allclose(w[:2], 1.0)  # (1 - t)^2 >= 1/25: the plain v-loss, untouched
    # in clean-image units the weight is 1/(1-t)^2 below the cap and exactly the cap above it (t = 0.9: 100 -> 25)
    err_x = jnp.square(x_hat - x)
    expected = jnp.minimum(1.0 / jnp.square(1.0 - t), 25.0)[:, None] * err_x
    np.testing.assert_allclose(w[:, None] * err_v, expected, rtol=1e-4)


def test_label_dropout_rate():
    y = jnp.zeros(50000, jnp.int32)
    dropped = flow.drop_labels(jax.random.PRNGKey(0), y, 0.1, 10)
    assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 0.01
    assert set(np.unique(np.asarray(dropped))) == {0, 10}


def test_guidance_scale_one_is_conditional():
    vc, vu = jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])
    np.testing.assert_allclose(flow.guided_velocity(vc, vu, 1.0), vc)
    np.testing.assert_allclose(flow.guided_velocity(vc, vu, 2.0), 2 * vc)


def test_projected_guidance_drops_only_the_part_along_the_clean_estimate():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    v_c, v_u, x_c = (jax.random.normal(k, (3, 4, 4, 1)) for k in (k1, k2, k3))
    np.testing.assert_allclose(flow.projected_guided_velocity(v_c, v_u, x_c, 2.5, eta=1.0),
                               flow.guided_velocity(v_c, v_u, 2.5), rtol=1e-5, atol=1e-5)   # eta = 1: plain
    update = flow.projected_guided_velocity(v_c, v_u, x_c, 2.5, eta=0.0) - v_c
    np.testing.assert_allclose(jnp.sum(update * x_c, axis=(1, 2, 3)), 0.0, atol=1e-4)  # orthogonal, per example
    assert float(jnp.abs(update).max()) > 0.1


def test_optimized_scale_leaves_out_only_a_difference_of_length():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    v_c, v_b = jax.random.normal(k1, (3, 4, 4, 1)), jax.random.normal(k2, (3, 4, 4, 1))
    s = flow.optimized_scale(v_c, v_b)
    assert s.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(jnp.sum((v_c - s * v_b) * v_b, axis=(1, 2, 3)), 0.0, atol=1e-4)  # the projection
    lengths = jnp.array([0.5, 2.0, -3.0]).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(flow.optimized_scale(v_c, lengths * v_c) * lengths, 1.0, rtol=1e-5)
