"""Muon's orthogonalisation with fewer flops for wide matrices: Newton-Schulz in its Gram form.

optax's Newton-Schulz iterates X <- aX + (bA + cA^2)X with A = XX^T on the m x n matrix (m <= n, after a transpose):
4m^2n + 2m^3 flops a step. Every iterate is X_k = Q_k X_0 with Q_k a polynomial in G = X_0 X_0^T, so the iteration can
run on m x m matrices alone and touch X_0 twice (G, then Q X_0):

    R_0 = G;  P_k = a + b R_k + c R_k^2;  Q_{k+1} = P_k Q_k;  R_{k+1} = X_{k+1} X_{k+1}^T = P_k R_k P_k

3 steps cost 4m^2n + 18m^3 instead of 12m^2n + 6m^3, less from n > 1.5m on. The iterates are the same in exact
arithmetic and agree to ~1e-6 relative in float32 (tests/test_optim.py). Used where n >= 2m (the blocks' qkv, MLP and
adaLN maps are 3-6x wider than tall); square matrices (attention's output map) keep the direct iteration.
Everything else about optax's Muon (momentum, scaling, decay, the Adam branch, the state) is untouched: `gram_muon`
swaps only the function its update calls, while that update is traced.
"""

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon

_DIRECT = _muon.orthogonalize_via_newton_schulz   # optax's own, for the cases below that keep it


def _orthogonalize_2d(x, coeffs, steps: int, eps):
    tall = x.shape[0] > x.shape[1]
    wide = x.T if tall else x
    m, n = wide.shape
    x0 = wide / (jnp.linalg.norm(wide) + eps)   # optax's "frobenius" preconditioning
    a, b, c = coeffs[0], coeffs[1], coeffs[2]
    if n < 2 * m:   # nearly square: optax's own step
        y = x0
        for _ in range(steps):
            y = _muon._base_newton_schulz_iteration(y, coeffs)
    else:
        r, q, eye = x0 @ x0.T, None, jnp.eye(m, dtype=x0.dtype)
        for k in range(steps):
            p = a * eye + b * r + c * (r @ r)
            q = p if q is None else p @ q
            if k < steps - 1:
                r = p @ (r @ p)
        y = x0 if q is None else q @ x0
    return y.T if tall else y


def orthogonalize(x, ns_coeffs, ns_steps=5, preconditioning="frobenius", eps=1e-8, dimension_numbers=None):
    """optax.contrib's orthogonalize_via_newton_schulz, same signature and result (to float32 rounding); other
    preconditionings and per-step coefficient tables go to optax's own."""
    if preconditioning != "frobenius" or jnp.ndim(ns_coeffs) != 1 or not isinstance(ns_steps, int):
        return _DIRECT(x, ns_coeffs, ns_steps, preconditioning, eps, dimension_numbers)
    if x.ndim == 2:
        dimension_numbers = _muon.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    reshape, inverse = _muon._compute_muon_reshape(x, dimension_numbers)
    coeffs = jnp.asarray(ns_coeffs).astype(x.dtype)
    return inverse(jax.vmap(lambda m: _orthogonalize_2d(m, coeffs, ns_steps, eps))(reshape(x)))


def gram_muon(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` (built by optax.contrib.muon) orthogonalising through `orthogonalize`. optax's update looks the function
    up in its module when traced, so it is swapped for the length of that call and put back after."""
    def update(updates, state, params=None):
        _muon.orthogonalize_via_newton_schulz = orthogonalize
        try:
            return tx.update(updates, state, params)
        finally:
            _muon.orthogonalize_via_newton_schulz = _DIRECT
    return optax.GradientTransformation(tx.init, update)
