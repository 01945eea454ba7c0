"""THE flow-matching convention of this project. Training and sampling both import it; nothing else defines it.

    t in [0, 1];  t = 0 is pure noise e ~ N(0, I),  t = 1 is data x.
    x_t = t * x + (1 - t) * e                      (rectified-flow / linear interpolant)
    v   = d x_t / d t = x - e                      (the velocity target)
    sampling integrates  d x / d t = v(x_t, t)  from t = 0 (noise) to t = 1 (data).

prediction = "v": the network output is the velocity itself.
prediction = "x": the network output is a clean-image estimate x_hat (JiT, "Back to Basics"), converted to a velocity
    v_hat = (x_hat - x_t) / (1 - t), with 1 - t clamped to at least t_eps; the loss is still on v (JiT's v-loss).
Loss: mean over all elements of (v_hat - v)^2 (plain MSE, not the seed's 1/2 MSE).
"""

import jax
import jax.numpy as jnp

from training.errors import UserError


PREDICTIONS = ("v", "x")
TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_t(key, n: int, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
             uniform_frac: float = 0.0, stratified: bool = False):
    """Training times. logit-normal(mean, std) puts more weight mid-trajectory (SD3, Esser et al. 2024).

    uniform_frac: each time is instead drawn uniform on [0, 1] with this probability. A noise-heavy logit-normal
    almost never draws t > 0.9 (for (-0.8, 0.8): p ~ 1e-4), yet the last sampling steps run there, and an
    x-predicting model never trained there returns a blurrier image than its noisy input (development_log.md).
    stratified: the batch's n quantiles come one from each of n equal strata of [0, 1], in random order (a
    low-discrepancy draw, as in VDM, Kingma et al. 2021): the same distribution per example, less variance over t in
    the batch's loss and gradient."""
    if kind not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time sampling {kind!r} ({' | '.join(TIME_SAMPLINGS)})")
    if stratified:
        k_perm, k_jit, key = jax.random.split(key, 3)
        strata = jax.random.permutation(k_perm, n).astype(jnp.float32)
        u = (strata + jax.random.uniform(k_jit, (n,), jnp.float32)) / n
        u = jnp.clip(u, 1e-6, 1.0 - 1e-6)   # ndtri(0) = -inf
        normal = lambda k: jax.scipy.special.ndtri(u)   # k unused: the stratified quantiles are drawn above
    else:
        normal = lambda k: jax.random.normal(k, (n,), jnp.float32)
    if kind == "uniform":
        return u if stratified else jax.random.uniform(key, (n,), jnp.float32)
    logit_normal = lambda k: jax.nn.sigmoid(mean + std * normal(k))
    if uniform_frac <= 0.0:   # the key used as is: the draws of runs saved before uniform_frac existed
        return logit_normal(key)
    k_n, k_u, k_pick = jax.random.split(key, 3)
    return jnp.where(jax.random.bernoulli(k_pick, uniform_frac, (n,)), jax.random.uniform(k_u, (n,), jnp.float32),
                     logit_normal(k_n))


def interpolate(x, eps, t):
    t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return t * x + (1.0 - t) * eps


def velocity_target(x, eps):
    return x - eps


def check_objective(train_cfg) -> None:
    """A bad train.prediction / train.time_sampling fails at start with one line, not inside the first traced step."""
    if str(train_cfg.prediction) not in PREDICTIONS:
        raise UserError(f"train.prediction={train_cfg.prediction} is not one of {' | '.join(PREDICTIONS)}")
    if str(train_cfg.time_sampling) not in TIME_SAMPLINGS:
        raise UserError(f"train.time_sampling={train_cfg.time_sampling} is not one of {' | '.join(TIME_SAMPLINGS)}")


def to_velocity(out, x_t, t, prediction: str = "v", t_eps: float = 0.05):
    """Turn the network output into a velocity, whatever it predicts."""
    if prediction == "v":
        return out
    if prediction == "x":
        t = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
        return (out - x_t) / jnp.maximum(1.0 - t, t_eps)
    raise ValueError(f"unknown prediction {prediction!r} ({' | '.join(PREDICTIONS)})")


def to_clean(out, x_t, t, prediction: str = "v"):
    """The network's clean-image estimate x_hat, whatever it predicts (x_t = t x + (1 - t) e => x = x_t + (1 - t) v)."""
    if prediction == "x":
        return out
    if prediction == "v":
        t = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
        return x_t + (1.0 - t) * out
    raise ValueError(f"unknown prediction {prediction!r} ({' | '.join(PREDICTIONS)})")


def cap_loss_weight(t, w_max: float, t_eps: float = 0.05):
    """Per-sample factor on the v-loss so that no time weighs more than w_max in clean-image units.

    The v-loss is the clean-image error weighted by 1 / (1 - t)^2 (v_hat - v = (x_hat - x) / (1 - t)): 400x at
    t = 0.95. Times near the data are easy yet would dominate the gradient once they are drawn at all
    (time_uniform_frac); capping the weight at w_max leaves every t with (1 - t)^2 >= 1 / w_max untouched."""
    one_minus_t = jnp.maximum(1.0 - t, t_eps)
    return jnp.minimum(1.0, w_max * jnp.square(one_minus_t))


def drop_labels(key, y, p: float, null_class: int):
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    return jnp.where(jax.random.bernoulli(key, p, y.shape), null_class, y)


def guided_velocity(v_cond, v_uncond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): extrapolate from the unconditional towards the conditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def optimized_scale(v_c, v_b):
    """CFG-Zero*'s s* (Fan et al. 2025), per example: the scalar s that brings s v_b closest to v_c,
    <v_c, v_b> / |v_b|^2. Guiding away from s* v_b instead of v_b leaves out the part of the two branches' gap that is
    only a difference of length, which an undertrained flow's branches show (sampler.opt_scale; development_log.md)."""
    axes = tuple(range(1, v_c.ndim))
    return jnp.sum(v_c * v_b, axis=axes, keepdims=True) / (jnp.sum(jnp.square(v_b), axis=axes, keepdims=True) + 1e-8)


def autoguided_velocity(v_cond, v_weak, v_uncond, auto_scale: float, cfg_scale: float):
    """Autoguidance (Karras et al. 2024) with optional plain guidance on top.

    v_weak: the same condition through a weaker model (here: an earlier EMA of the same run). Extrapolating away
    from it corrects what the better model has only partly learnt without the loss of diversity that guiding away
    from the unconditional branch brings. auto_scale = 1 is plain guidance; both = 1 is the conditional model."""
    return v_cond + (auto_scale - 1.0) * (v_cond - v_weak) + (cfg_scale - 1.0) * (v_cond - v_uncond)


def projected_guided_velocity(v_cond, v_uncond, x_cond, scale: float, eta: float = 0.0):
    """Adaptive projected guidance (APG, Sadat et al. 2024) without its momentum and norm threshold.

    The guidance update is split, per example, into its part parallel to the conditional clean-image estimate
    x_cond and the rest; the parallel part (which only scales the image: over-bright, low-diversity samples at high
    scales) is kept with weight eta. eta = 1 is plain guidance. Because v and x_hat differ by x_t and a factor
    1 / (1 - t) shared by both branches, projecting the velocity difference equals projecting the x_hat difference."""
    diff = v_cond - v_uncond
    axes = tuple(range(1, diff.ndim))
    unit = x_cond / jnp.sqrt(jnp.sum(jnp.square(x_cond), axis=axes, keepdims=True) + 1e-12)
    parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    return v_cond + (scale - 1.0) * (diff - (1.0 - eta) * parallel)
