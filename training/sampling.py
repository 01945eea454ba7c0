"""ODE sampling with Diffrax and classifier-free guidance, in fixed-size chunks.

Integrates d x / d t = v(x, t, c) from t = 0 (noise) to t = 1 (data) -- the convention of training/flow.py.
Solvers: euler and heun with `steps` fixed steps; tsit5 and dopri5 adaptive under a PID step-size controller
(rtol/atol), starting from dt = 1/steps. With `noise` > 0 the euler solver integrates instead the stochastic
differential equation with the same marginals (Euler-Maruyama, see `sde_terms`); `shift` warps the fixed-step grid
(`time_grid`). Guidance evaluates the conditional and null-condition velocities in one batched call. Requests larger
than `chunk` run chunk by chunk through one compiled function, so memory is bounded by the chunk, not by the number
of samples (the JiT reproduction crashed sampling 50k images at once).
"""

import functools
from typing import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from models import apply
from training import flow
from training.errors import UserError, check_whole
from training.interrupts import DeferredInterrupt
from training.step import DTYPES, cast_floats

SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
ADAPTIVE = ("tsit5", "dopri5")
GUIDANCE = ("cfg", "apg", "auto")


def null_fn(cond_null) -> Callable:
    """Conditions (a tuple of per-example arrays) -> the null conditions. An int is a null class id (stage 1);
    a callable is used as is (stage 2: keep the caption arrays, set the per-example `drop` flag)."""
    if callable(cond_null):
        return cond_null
    return lambda cond: tuple(jnp.full_like(c, cond_null) for c in cond)


def make_velocity(model, cond_null, *, cfg_scale: float, prediction: str = "v", t_eps: float = 0.05,
                  dtype=jnp.float32, cfg_interval=None, guidance: str = "cfg", apg_eta: float = 0.0,
                  weak=None, guide_scale: float = 1.0, guide_interval=None, opt_scale: bool = False) -> Callable:
    """v(t, x, cond) for a batch, with classifier-free guidance when cfg_scale != 1.

    cond: per-example model arguments after (x, t): an array of labels, or a tuple of arrays (stage 2:
    caption states, mask, drop).
    cfg_interval: (lo, hi) or None. Guidance only while lo <= t <= hi (t = 0 noise, 1 data), plain conditional
    velocity elsewhere (guidance interval, Kynkaanniemi et al. 2024): strong guidance at high noise collapses
    diversity, at low noise it only sharpens. None = guidance at every t.
    guidance: "cfg" (plain) or "apg" (flow.projected_guided_velocity: the update's part along the conditional clean
    estimate kept with weight apg_eta) or "auto" (flow.autoguided_velocity: `weak`, a weaker model of the same
    architecture, guided away from with guide_scale within guide_interval (None: at every t), plus plain guidance
    with cfg_scale within cfg_interval).
    opt_scale: each branch guided away from (unconditional, weak) enters scaled by flow.optimized_scale (CFG-Zero*;
    its zero-init is `solve`'s start)."""
    mdl, null = cast_floats(model, dtype), null_fn(cond_null)

    weak_mdl = None if weak is None else cast_floats(weak, dtype)
    if guidance == "auto" and weak is None:
        raise ValueError("guidance='auto' needs the weak model")

    def raw(x, t, cond, m=None):
        m = mdl if m is None else m
        out = apply(m, x.astype(dtype), t, *cond).astype(jnp.float32)
        return flow.to_velocity(out, x, t, prediction, t_eps), out

    def cond_and_null(x, t, cond):
        both, out = raw(jnp.concatenate([x, x]), t,
                        jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, null(cond)))
        v_c, v_u = jnp.split(both, 2)
        return v_c, v_u, jnp.split(out, 2)[0]

    def star(v_c, v_b):
        return flow.optimized_scale(v_c, v_b) * v_b if opt_scale else v_b

    def v(t, x, cond):
        cond = cond if isinstance(cond, tuple) else (cond,)
        if cfg_scale == 1.0 and guidance != "auto":
            return raw(x, t, cond)[0]
        if cfg_scale == 1.0:   # autoguidance alone: no unconditional branch needed
            v_c = v_u = raw(x, t, cond)[0]
        else:
            v_c, v_u, out_c = cond_and_null(x, t, cond)
            v_u = star(v_c, v_u)
        scale = within(cfg_interval, t, cfg_scale)
        if guidance == "auto":
            return flow.autoguided_velocity(v_c, star(v_c, raw(x, t, cond, weak_mdl)[0]), v_u,
                                            within(guide_interval, t, guide_scale), scale)
        if guidance == "apg":
            return flow.projected_guided_velocity(v_c, v_u, flow.to_clean(out_c, x, t, prediction), scale, apg_eta)
        return flow.guided_velocity(v_c, v_u, scale)

    return v


def within(interval, t, scale):
    """A guidance scale that applies only for lo <= t <= hi (1.0, no guidance, elsewhere); None: at every t."""
    return scale if interval is None else jnp.where((t >= interval[0]) & (t <= interval[1]), scale, 1.0)


def sde_terms(v, noise: float, shape, key):
    """Drift and diffusion of the reverse SDE whose marginals are those of the flow d x / d t = v (t: noise -> data).

    Adding (g^2 / 2) * score to the drift and g dW as noise leaves every marginal p_t unchanged (Fokker-Planck). With
    x_t = t x + (1 - t) e the score is -E[e | x_t] / (1 - t), and E[e | x_t] = x_t - t v. Choosing g^2 = 2 noise (1 - t)
    makes both terms finite up to t = 1:  dx = [v - noise (x_t - t v)] dt + sqrt(2 noise (1 - t)) dW.
    The injected noise re-randomises part of the sample at every step, so errors of an imperfect model do not simply
    accumulate along one deterministic path (EDM's "churn", SiT's SDE sampler); noise = 0 is the ODE."""
    def drift(t, x, args):
        vel = v(t, x, args)
        return vel - noise * (x - t * vel)

    def diffusion(t, x, args):
        return lineax.DiagonalLinearOperator(jnp.full(x.shape, jnp.sqrt(2.0 * noise * (1.0 - t)), x.dtype))

    brownian = diffrax.UnsafeBrownianPath(shape=shape, key=key)   # fixed steps only: cheap, exact increments
    return diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian))


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """Fixed-step times 0 = t_0 < ... < t_steps = 1. shift > 1 warps the noise level 1 - t as SD3's resolution shift
    does (sigma -> shift sigma / (1 + (shift - 1) sigma)): smaller steps at high noise, and the last step starts
    further from the data, where a model trained on noise-heavy times has seen the fewest examples."""
    sigma = 1.0 - np.linspace(0.0, 1.0, steps + 1)
    ts = 1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma)
    ts[0], ts[-1] = 0.0, 1.0   # exactly: at shift 0.3, 1 + (0.3 - 1) != 0.3 in floats, and diffrax wants t0 == ts[0]
    return ts


def solve(v, x0, *, solver: str = "euler", steps: int = 32, rtol: float = 1e-3, atol: float = 1e-3, args=None,
          noise: float = 0.0, key=None, shift: float = 1.0, start: int = 0):
    """(x at t = 1, diffrax's result code): the caller checks the code (sample raises on the host).
    start (fixed-step solvers): the solve begins at the grid's time t_start from x0, as if the first `start` steps
    had zero velocity (CFG-Zero*'s zero-init) without evaluating the model there."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: one of {', '.join(SOLVERS)}")
    ts = time_grid(steps, shift)[start:]
    t0 = float(ts[0])
    # shift 1: uniform steps through ConstantStepSize (what runs saved before `shift` existed used); else StepTo(ts).
    fixed = (lambda t1: (diffrax.ConstantStepSize(), 1.0 / steps)) if shift == 1.0 else \
        (lambda t1: (diffrax.StepTo(ts=jnp.asarray(ts[ts <= t1 + 1e-9], jnp.float32)), None))
    if noise > 0.0:
        if solver != "euler":
            raise ValueError(f"sampler.noise > 0 integrates an SDE with Euler-Maruyama: solver must be euler, "
                             f"not {solver!r}")
        # Euler-Maruyama up to the last step, then one noise-free Euler step: noise injected there would stay in the
        # image (the final step moves to, or with t_eps > its length most of the way to, the clean estimate).
        t_last = float(ts[-2]) if len(ts) > 1 else t0
        x, result = x0, diffrax.RESULTS.successful
        if t0 < t_last:   # else every step but the last was zeroed
            controller, dt0 = fixed(t_last)
            sol = diffrax.diffeqsolve(sde_terms(v, noise, x0.shape, key), diffrax.Euler(), t0=t0, t1=t_last, dt0=dt0,
                                      y0=x0, args=args, saveat=diffrax.SaveAt(t1=True),
                                      stepsize_controller=controller, max_steps=steps + 1, throw=False,
                                      adjoint=diffrax.ForwardMode())   # no reverse-mode through sampling anyway
            x, result = sol.ys[-1], sol.result
        return x + (1.0 - t_last) * v(jnp.float32(t_last), x, args), result
    if solver in ADAPTIVE:
        (controller, dt0), max_steps = (diffrax.PIDController(rtol=rtol, atol=atol), 1.0 / steps), adaptive_cap(steps)
    else:
        (controller, dt0), max_steps = fixed(1.0), steps + 1
    sol = diffrax.diffeqsolve(diffrax.ODETerm(v), SOLVERS[solver](), t0=t0, t1=1.0, dt0=dt0, y0=x0,
                              args=args, saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
                              max_steps=max_steps, throw=False)
    return sol.ys[-1], sol.result


def adaptive_cap(steps: int) -> int:
    """The most steps an adaptive solver may take (`steps` sets its first one, 1/steps): a bound on the time a too
    tight rtol/atol can cost, which `sample` reports as a UserError."""
    return 16 * steps + 64


def check_sampler(sampler_cfg):
    """One line for a bad sampler config; training calls this at start, not at its first sample grid.
    Returns (intervals, shift, noise, t_eps): the plain and the autoguidance intervals ({"cfg": ..., "guide": ...},
    each (lo, hi) or None: guidance at every t), the parsed step-grid shift and SDE noise (keys absent in configs
    saved before they existed get None, 1.0 and 0.0), and the sampler's own x-prediction clamp, or None for the
    training one."""
    if sampler_cfg.solver not in SOLVERS:
        raise UserError(f"unknown sampler.solver={sampler_cfg.solver!r}: one of {', '.join(SOLVERS)}")
    for key in ("steps", "chunk"):   # chunk < 1 would drop images (labels kept), steps 0 divide by zero
        check_whole(f"sampler.{key}", sampler_cfg.get(key, None))
    intervals = {}
    for name in ("cfg", "guide"):
        interval = sampler_cfg.get(f"{name}_interval", None)   # absent in configs saved before it existed
        interval = None if interval is None else tuple(float(b) for b in interval)
        if interval is not None and not (len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0):
            raise UserError(f"sampler.{name}_interval={list(interval)} must be [lo, hi] with 0 <= lo <= hi <= 1, "
                            f"or null")
        intervals[name] = interval
    if sampler_cfg.get("guidance", "cfg") not in GUIDANCE:
        raise UserError(f"unknown sampler.guidance={sampler_cfg.guidance!r}: one of {', '.join(GUIDANCE)}")
    shift, noise = (float(sampler_cfg.get(k) if sampler_cfg.get(k) is not None else d)
                    for k, d in (("shift", 1.0), ("noise", 0.0)))
    if shift <= 0.0 or (shift != 1.0 and sampler_cfg.solver in ADAPTIVE):
        raise UserError(f"sampler.shift={shift} must be > 0, and != 1 only with a fixed-step solver (euler, heun); "
                        f"got solver={sampler_cfg.solver!r}")
    if shift != 1.0 and not (np.diff(time_grid(int(sampler_cfg.steps), shift).astype(np.float32)) > 0).all():
        # a tiny shift packs the first steps closer than float32 tells apart: diffrax's StepTo would raise mid-solve
        raise UserError(f"sampler.shift={shift} puts neighbouring times of the {int(sampler_cfg.steps)}-step grid "
                        f"closer than float32 resolves: use a shift nearer 1, or fewer steps")
    t_eps = sampler_cfg.get("t_eps", None)
    t_eps = None if t_eps is None else float(t_eps)
    if t_eps is not None and not 0.0 < t_eps < 1.0:
        raise UserError(f"sampler.t_eps={t_eps} must be in (0, 1), or null for the training value train.t_eps")
    zero_steps = sampler_cfg.get("zero_steps", 0)
    if zero_steps is not None and zero_steps != 0:
        check_whole("sampler.zero_steps", zero_steps, 0, "the first steps whose velocity is zeroed")
        if int(zero_steps) >= int(sampler_cfg.steps) and sampler_cfg.solver not in ADAPTIVE:   # those ignore it
            raise UserError(f"sampler.zero_steps={zero_steps} zeroes every one of the {sampler_cfg.steps} steps: "
                            f"use fewer (CFG-Zero*: 1), or 0")
    if noise < 0.0 or (noise > 0.0 and sampler_cfg.solver != "euler"):
        raise UserError(f"sampler.noise={noise} must be >= 0, and > 0 only with sampler.solver=euler "
                        f"(Euler-Maruyama); got solver={sampler_cfg.solver!r}")
    return intervals, shift, noise, t_eps


def sample(model, labels, key, *, null_cond, shape, sampler_cfg, prediction="v", t_eps=0.05,
           precision="float32", weak=None, finish=None, first: int = 0) -> np.ndarray:
    """Generate one image per condition (model space, float32, (N, H, W, C)) in chunks of sampler_cfg.chunk.
    finish: applied to each chunk as it comes (generate: to uint8 images, through the VAE for latents), so a large
    request holds its result once, never all of it in float32 (50k pixel images of 256x256x3: 39 GB).
    first: the index of labels[0] in a larger request sampled in parts (sample.py): image i's noise is that request's.

    labels: class ids (N,), or a tuple of per-example arrays with leading axis N (stage 2, see make_velocity).
    t_eps: x-prediction's clamp on 1 - t (flow.to_velocity), the training value; sampler_cfg.t_eps replaces it when
    set. It decides how far the last steps go: with 32 Euler steps and t_eps 0.05 the last one moves 1/32 / 0.05 =
    62.5% of the way to the clean estimate, and that partial step is worth a lot of FD (development_log.md).
    weak: the weaker model for sampler_cfg.guidance = "auto" (training.checkpoint: an earlier EMA of the run)."""
    intervals, shift, noise, own_t_eps = check_sampler(sampler_cfg)
    # zeroed first steps (CFG-Zero*): the solve starts later; absent in runs saved before it existed; adaptive: ignored
    start = 0 if sampler_cfg.solver in ADAPTIVE else int(sampler_cfg.get("zero_steps", 0) or 0)
    conds = tuple(np.asarray(c) for c in labels) if isinstance(labels, tuple) else (np.asarray(labels, np.int32),)
    n = len(conds[0])
    # A request smaller than a chunk runs as one smaller chunk; a part of a larger one (first > 0) keeps the request's
    # chunk, so its last chunk is padded as the whole request's was: the same batches, the same bits.
    chunk = int(sampler_cfg.chunk if first else min(sampler_cfg.chunk, max(n, 1)))
    velocity = (("cfg_scale", float(sampler_cfg.cfg_scale)), ("prediction", prediction),
                ("t_eps", float(t_eps if own_t_eps is None else own_t_eps)),   # null: the training clamp passed in
                ("dtype", DTYPES[precision]), ("cfg_interval", intervals["cfg"]),
                ("guide_interval", intervals["guide"]), ("guidance", str(sampler_cfg.get("guidance", "cfg"))),
                ("apg_eta", float(sampler_cfg.get("apg_eta", 0.0))),
                ("guide_scale", float(sampler_cfg.get("guide_scale", 1.0))),
                ("opt_scale", bool(sampler_cfg.get("opt_scale", False))))
    solver = (("solver", str(sampler_cfg.solver)), ("steps", int(sampler_cfg.steps)),
              ("rtol", float(sampler_cfg.rtol)), ("atol", float(sampler_cfg.atol)), ("noise", noise), ("shift", shift),
              ("start", start))
    run = _chunk_sampler(null_cond, tuple(int(d) for d in shape), chunk, velocity, solver)

    out = None
    with DeferredInterrupt() as stop:   # Ctrl-C between chunks, never inside a running solve
        for start in range(0, n, chunk):
            stop.check()
            y = tuple(c[start:start + chunk] for c in conds)
            pad = chunk - len(y[0])
            y = tuple(np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in y)  # same shape: no recompile
            x, over, failed = (np.asarray(a) for a in run(model, weak, key, jnp.uint32(first + start),
                                                          tuple(jnp.asarray(c) for c in y)))
            bad = ~np.isfinite(x[:chunk - pad]).reshape(chunk - pad, -1).all(1)
            if bad.any():   # checked first: an adaptive solver meets NaN as endless step rejections (`over`)
                raise UserError(f"the sampler produced non-finite images ({int(bad.sum())} of {chunk - pad} in this "
                                f"chunk) with cfg_scale={sampler_cfg.cfg_scale}, "
                                f"guide_scale={sampler_cfg.get('guide_scale', 1.0)}, "
                                f"noise={sampler_cfg.get('noise', 0.0)}: lower the guidance scales or the noise")
            if over.any():
                raise UserError(f"sampler.solver={sampler_cfg.solver} needed more than "
                                f"{adaptive_cap(int(sampler_cfg.steps))} steps at rtol={sampler_cfg.rtol}, "
                                f"atol={sampler_cfg.atol}: loosen sampler.rtol/atol (e.g. 1e-3) or raise sampler.steps "
                                f"(the cap grows with it); if they are loose already, the velocity may not be finite: "
                                f"lower cfg_scale / guide_scale")
            if failed.any():
                raise RuntimeError(f"the sampler's ODE solve failed for {int(failed.sum())} of {chunk} images")
            if finish is None:
                x = x[:chunk - pad]
            else:
                with stop.immediate():   # a VAE decode stops at a Ctrl-C (it used to be held until it finished)
                    x = finish(x[:chunk - pad])
            if out is None:   # one array filled in place: a list and a concatenate held the result twice
                out = np.empty((n, *x.shape[1:]), x.dtype)
            out[start:start + len(x)] = x
    return out if out is not None else np.zeros((0,) + tuple(shape), np.float32)


@functools.lru_cache(maxsize=16)
def _chunk_sampler(null_cond, shape: tuple, chunk: int, velocity: tuple, solver: tuple) -> Callable:
    """The compiled function that samples one chunk, one per setting: made afresh inside `sample`, it was traced and
    compiled again at every call (each grid during training, 3-11 s each on 2 CPU cores; development_log.md).
    velocity / solver: make_velocity's and solve's keyword arguments, as hashable (name, value) pairs."""

    @eqx.filter_jit
    def run(model, weak, key, start, y):
        v = make_velocity(model, null_cond, weak=weak, **dict(velocity))

        def one(k, c):
            # One image: its starting noise (and, for the SDE, its Brownian path) from its own key, and its own solve
            # (an adaptive solver's step sizes follow this image's error alone). vmap makes it one batched model
            # call per step, as before; what an image gets no longer depends on the chunk it shares.
            x0, k_w = image_noise(k, shape), jax.random.split(k)[1]
            v1 = lambda t, x, cc: v(t, x[None], tuple(a[None] for a in cc))[0]
            x, result = solve(v1, x0, args=c, key=k_w, **dict(solver))
            # diffrax's own failure check (throw=True) is a host callback, and JAX's persistent cache stores no
            # program with one: the result codes come back with the images and `sample` raises on the host instead.
            return x, result == diffrax.RESULTS.max_steps_reached, result != diffrax.RESULTS.successful

        return jax.vmap(one)(image_keys(key, start, chunk), y)

    return run


def image_keys(key, start: int, count: int):
    """The keys of images start .. start + count - 1 of a request: image i's randomness is fold_in(key, i), whatever
    the chunk size, so a seed gives the same images at any sampler.chunk (up to float rounding of batched math)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(count, dtype=jnp.uint32))


def image_noise(key, shape) -> jax.Array:
    """The starting noise x0 of the image whose key (image_keys) is `key`."""
    return jax.random.normal(jax.random.split(key)[0], tuple(shape), jnp.float32)


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ...: class-balanced requests (sorted by class for readable grids)."""
    return np.sort(np.arange(n) % num_classes).astype(np.int32)
