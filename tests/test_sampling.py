import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from models import build_model, model_spec
from training.cli import compose
from training.errors import UserError
from training.sampling import balanced_labels, image_keys, image_noise, sample, time_grid


class GaussianShift(eqx.Module):
    """Exact rectified-flow velocity when the data for class y is N(k y, 1): the ODE maps noise x0 to x0 + k y."""
    k: float = 1.0

    def __call__(self, x, t, y):
        mu = self.k * y.astype(jnp.float32)
        return mu + (2 * t - 1) / (t ** 2 + (1 - t) ** 2) * (x - t * mu)


def start_noise(key, n, shape):
    """The starting noise `sample` draws for images 0..n-1 of a request with this key, whatever the chunk."""
    return np.asarray(jax.vmap(lambda k: image_noise(k, shape))(image_keys(key, 0, n)))


def sampler_cfg(**kw):
    base = {"solver": "euler", "steps": 100, "rtol": 1e-5, "atol": 1e-5, "cfg_scale": 1.0, "chunk": 256}
    return OmegaConf.create({**base, **kw})


def test_solvers_reach_the_known_endpoint():
    labels = np.array([0, 1, 2, 3], np.int32)
    key = jax.random.PRNGKey(0)
    x0 = start_noise(key, 4, (2, 2, 1))
    want = np.asarray(x0) + labels[:, None, None, None]
    errs = {}
    for solver, steps in (("euler", 200), ("heun", 50), ("tsit5", 8), ("dopri5", 8)):
        out = sample(GaussianShift(), labels, key, null_cond=99, shape=(2, 2, 1), sampler_cfg=sampler_cfg(
            solver=solver, steps=steps))
        errs[solver] = float(np.abs(out - want).max())
    assert errs["euler"] < 2e-2 and errs["heun"] < 2e-3 and errs["tsit5"] < 1e-3 and errs["dopri5"] < 1e-3, errs
    assert errs["heun"] < errs["euler"]


def test_guidance_scale_one_ignores_the_null_condition():
    key, labels = jax.random.PRNGKey(1), np.array([2, 3], np.int32)
    a = sample(GaussianShift(), labels, key, null_cond=0, shape=(2, 2, 1), sampler_cfg=sampler_cfg(steps=10))
    b = sample(GaussianShift(), labels, key, null_cond=0, shape=(2, 2, 1), sampler_cfg=sampler_cfg(steps=10,
                                                                                                    cfg_scale=2.0))
    # With the null class's mean 0, guidance scale 2 doubles the shift: endpoints x0 + 2y instead of x0 + y.
    np.testing.assert_allclose(b - a, np.broadcast_to(labels[:, None, None, None], a.shape), atol=2e-2)


def test_guidance_interval_limits_guidance_to_its_times():
    """Guidance only for lo <= t <= hi. With the null class at mean 0, guidance adds a drift in the direction of y
    at every guided time, so a middle interval ends strictly between no guidance (x0 + y) and full (x0 + 2y)."""
    key, labels = jax.random.PRNGKey(2), np.array([1, 3], np.int32)
    run = lambda **kw: sample(GaussianShift(), labels, key, null_cond=0, shape=(2, 2, 1),
                              sampler_cfg=sampler_cfg(steps=10, **kw))
    none, full = run(cfg_scale=1.0), run(cfg_scale=2.0)
    np.testing.assert_array_equal(run(cfg_scale=2.0, cfg_interval=[0.0, 1.0]), full)
    # Euler evaluates t <= 0.9; scale 1 there is v_u + 1 (v_c - v_u): v_c up to rounding
    np.testing.assert_allclose(run(cfg_scale=2.0, cfg_interval=[0.95, 1.0]), none, atol=1e-6)
    mid = run(cfg_scale=2.0, cfg_interval=[0.3, 0.7])
    assert np.all(mid > none + 1e-3) and np.all(mid < full - 1e-3)
    with pytest.raises(UserError, match="cfg_interval"):
        run(cfg_scale=2.0, cfg_interval=[0.7, 0.3])


def test_autoguidance_extrapolates_away_from_the_weak_model():
    """The velocity is affine in the class mean, so guiding a model of N(y, 1) away from a weak one of N(y / 2, 1)
    with scale 2 is the exact flow of N(1.5 y, 1): endpoints x0 + 1.5 y. Plain guidance adds on top."""
    key, labels = jax.random.PRNGKey(3), np.array([1, 2], np.int32)
    run = lambda weak, **kw: sample(GaussianShift(), labels, key, null_cond=0, shape=(2, 2, 1), weak=weak,
                                    sampler_cfg=sampler_cfg(steps=10, **kw))
    plain = run(None)
    y = np.broadcast_to(labels[:, None, None, None], plain.shape)
    auto = run(GaussianShift(k=0.5), guidance="auto", guide_scale=2.0)
    np.testing.assert_allclose(auto - plain, 0.5 * y, atol=2e-2)
    both = run(GaussianShift(k=0.5), guidance="auto", guide_scale=2.0, cfg_scale=2.0)   # null class mean 0: + y
    np.testing.assert_allclose(both - plain, 1.5 * y, atol=3e-2)
    # a weak model equal to the model: no autoguidance at all
    np.testing.assert_allclose(run(GaussianShift(), guidance="auto", guide_scale=3.0), plain, atol=1e-6)
    # guide_interval limits the push away from the weak model to its times, and only that push: plain guidance stays
    weak = GaussianShift(k=0.5)
    np.testing.assert_array_equal(run(weak, guidance="auto", guide_scale=2.0, guide_interval=[0.0, 1.0]), auto)
    np.testing.assert_array_equal(run(weak, guidance="auto", guide_scale=2.0, guide_interval=[0.95, 1.0]),
                                  run(weak, guidance="auto", guide_scale=1.0))   # Euler evaluates t <= 0.9
    mid = run(weak, guidance="auto", guide_scale=2.0, guide_interval=[0.3, 0.7])
    assert np.all(mid > plain + 1e-3) and np.all(mid < auto - 1e-3)
    np.testing.assert_allclose(run(weak, guidance="auto", guide_scale=2.0, cfg_scale=2.0, guide_interval=[0.95, 1.0])
                               - plain, y, atol=2e-2)
    with pytest.raises(UserError, match="guide_interval"):
        run(weak, guidance="auto", guide_scale=2.0, guide_interval=[0.7, 0.3])


def test_stochastic_sampling_keeps_the_data_distribution():
    """With the exact velocity, the SDE (sampler.noise > 0) must end on the data law N(k y, 1) like the ODE, but on
    other points than the ODE's deterministic map. A wrong sign or scale of the score term breaks the variance."""
    labels = np.repeat(np.array([0, 2], np.int32), 2)
    key = jax.random.PRNGKey(4)
    run = lambda **kw: sample(GaussianShift(), labels, key, null_cond=99, shape=(32, 32, 1),
                              sampler_cfg=sampler_cfg(steps=200, **kw))
    ode = run()
    for noise in (0.5, 2.0):
        sde = run(noise=noise)
        assert np.abs(sde - ode).mean() > 0.1 * noise   # the paths really are stochastic
        for i, y in enumerate(labels):
            assert abs(sde[i].mean() - y) < 0.1 and abs(sde[i].std() - 1.0) < 0.06, (noise, i, sde[i].std())
    np.testing.assert_array_equal(run(noise=1.0), run(noise=1.0))   # same seed, same noise path
    with pytest.raises(UserError, match="noise"):
        run(noise=1.0, solver="heun")


def test_shifted_step_grid_moves_steps_towards_the_noise_and_still_solves():
    ts = time_grid(8, 3.0)
    assert ts[0] == 0.0 and ts[-1] == 1.0 and np.all(np.diff(ts) > 0)
    np.testing.assert_allclose(time_grid(8, 1.0), np.linspace(0, 1, 9), atol=1e-12)
    assert ts[-2] < 7 / 8 and ts[1] < 1 / 8   # shorter first steps, an earlier start of the last one
    labels, key = np.array([0, 1, 2, 3], np.int32), jax.random.PRNGKey(0)
    x0 = start_noise(key, 4, (2, 2, 1))
    want = np.asarray(x0) + labels[:, None, None, None]
    run = lambda **kw: sample(GaussianShift(), labels, key, null_cond=99, shape=(2, 2, 1),
                              sampler_cfg=sampler_cfg(**kw))
    assert np.abs(run(solver="heun", steps=50, shift=3.0) - want).max() < 2e-3
    uniform, shifted = run(steps=8), run(steps=8, shift=3.0)
    assert np.abs(shifted - uniform).max() > 1e-3   # the grid is really used
    with pytest.raises(UserError, match="shift"):
        run(solver="tsit5", shift=3.0)
    # shift < 1 (smaller steps near the data): its grid's ends were off by an ulp (1 + (0.3 - 1) != 0.3), which
    # diffrax refused mid-solve with a traceback; a tiny shift packs times closer than float32 resolves: one line.
    assert time_grid(32, 0.3)[0] == 0.0 and time_grid(32, 0.3)[-1] == 1.0
    assert np.abs(run(solver="heun", steps=50, shift=0.3) - want).max() < 2e-3
    with pytest.raises(UserError, match="closer than float32 resolves"):
        run(shift=1e-6)


class ConstantClean(eqx.Module):
    """An x-predicting model whose clean estimate is c everywhere, whatever x and t."""
    c: float = 2.0

    def __call__(self, x, t, y):
        return jnp.full_like(x, self.c)


def test_sampler_t_eps_sets_how_far_the_last_step_goes():
    """x-prediction turns x_hat into v = (x_hat - x) / max(1 - t, t_eps). Below 1 / steps the clamp never binds and
    Euler's last step lands on x_hat exactly; at t_eps = 2 / steps the last step goes half way; null keeps the
    training clamp passed in."""
    labels, key = np.array([0, 1], np.int32), jax.random.PRNGKey(3)
    x0 = start_noise(key, 2, (2, 2, 1))
    run = lambda t_eps_train=0.05, **kw: sample(ConstantClean(), labels, key, null_cond=9, shape=(2, 2, 1),
                                                prediction="x", t_eps=t_eps_train,
                                                sampler_cfg=sampler_cfg(steps=8, **kw))
    np.testing.assert_allclose(run(t_eps=0.1), 2.0, atol=1e-6)                 # 1 - t >= 1/8 > 0.1 at every step
    # Unclamped, the gap shrinks with 1 - t: (x0 - 2) / 8 before the last step, which the clamp halves.
    np.testing.assert_allclose(run(t_eps=0.25) - 2.0, (x0 - 2.0) / 16, atol=1e-5)
    np.testing.assert_array_equal(run(t_eps_train=0.25, t_eps=None), run(t_eps=0.25))
    np.testing.assert_array_equal(run(t_eps_train=0.25), run(t_eps=0.25))
    with pytest.raises(UserError, match="t_eps"):
        run(t_eps=0.0)


def test_sampler_is_deterministic_and_chunked():
    cfg = compose("config", ["model=tiny"])
    spec = model_spec(cfg.model, {"shape": [8, 8, 1], "num_classes": 10})
    model = jax.tree.map(lambda a: a + 0.02, build_model(spec, key=jax.random.PRNGKey(0)))
    labels = balanced_labels(7, 10)
    run = lambda seed, chunk, **kw: sample(model, labels, jax.random.PRNGKey(seed), null_cond=10, shape=(8, 8, 1),
                                           sampler_cfg=sampler_cfg(**{"steps": 4, "chunk": chunk, "cfg_scale": 1.5,
                                                                      **kw}))
    a, b = run(0, 3), run(0, 3)
    assert a.shape == (7, 8, 8, 1) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # same seed, same images, bit for bit
    assert not np.allclose(a, run(1, 3))  # another seed, other images
    # Image i's randomness is its own (fold_in(key, i)): the chunk size changes batching only, so the same images
    # up to float rounding. Before, noise was drawn per chunk and chunk 3 vs 7 gave other images from image 1 on.
    # An adaptive solve follows each image's own error, but rounding can flip a step's acceptance, and this random
    # model's ODE amplifies that: the same images hold to ~2e-3 at rtol 1e-5 (to 0.04 at 1e-4, too close to the
    # bound below to hold on every CPU; bench/sampler_chunks.py), not to rounding.
    for kw, tol in (({}, 1e-4), ({"noise": 0.5}, 1e-4), ({"solver": "tsit5", "rtol": 1e-5, "atol": 1e-5}, 5e-2)):
        cfg_kw = {"steps": 64, **kw} if "solver" in kw else kw
        whole = run(0, 7, **cfg_kw)
        np.testing.assert_allclose(run(0, 3, **cfg_kw), whole, atol=tol, err_msg=str(kw))
        np.testing.assert_allclose(run(0, 2, **cfg_kw)[2:5], whole[2:5], atol=tol, err_msg=str(kw))
    # A request's first images are the same whatever follows them
    np.testing.assert_allclose(sample(model, labels[:4], jax.random.PRNGKey(0), null_cond=10, shape=(8, 8, 1),
                                      sampler_cfg=sampler_cfg(steps=4, chunk=4, cfg_scale=1.5)), a[:4], atol=1e-4)
    # finish= turns each chunk into images as it comes (a large request never holds all of it in float32): the same
    # images, one call per chunk, never more than a chunk at once
    seen = []
    as_uint8 = lambda x: seen.append(len(x)) or np.clip(np.rint(x * 100 + 128), 0, 255).astype(np.uint8)
    imgs = sample(
        model, labels, jax.random.PRNGKey(0), null_cond=10, shape=(8, 8, 1),
        sampler_cfg=sampler_cfg(steps=4, chunk=3, cfg_scale=1.5), finish=as_uint8)
    assert seen == [3, 3, 1] and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, np.clip(np.rint(a * 100 + 128), 0, 255).astype(np.uint8))


def test_bad_chunk_or_steps_are_one_user_error():
    """chunk -1 used to write fewer images than labels (a misaligned npz), chunk 0 and steps 0 crashed."""
    run = lambda **kw: sample(GaussianShift(), np.arange(4, dtype=np.int32), jax.random.PRNGKey(0), null_cond=9,
                              shape=(2,), sampler_cfg=sampler_cfg(**{"steps": 4, **kw}))
    for kw in ({"chunk": -1}, {"chunk": 0}, {"chunk": 2.5}, {"steps": 0}, {"steps": True}):
        with pytest.raises(UserError, match=f"sampler.{next(iter(kw))}=.* must be a whole number >= 1"):
            run(**kw)
    assert run(chunk=3).shape == (4, 2)


def test_an_adaptive_solve_over_its_step_cap_is_one_user_error():
    """A tolerance fp32 cannot reach makes tsit5 take its 16 * steps + 64 = 80 steps: one line saying what to loosen,
    not diffrax's runtime error."""
    with pytest.raises(UserError, match=r"tsit5 needed more than 80 steps at rtol=1e-12.*loosen sampler.rtol/atol"):
        sample(GaussianShift(), np.array([0, 1], np.int32), jax.random.PRNGKey(0), null_cond=9, shape=(2,),
               sampler_cfg=sampler_cfg(solver="tsit5", steps=1, rtol=1e-12, atol=1e-12))


class Overflowing(eqx.Module):
    """What a guidance scale or SDE noise too large for fp32 does to the velocity."""

    def __call__(self, x, t, y):
        return x * jnp.float32(1e38) * jnp.float32(1e38)


def test_non_finite_samples_are_one_user_error():
    """Velocities that overflow fp32 (sample.py cfg_scale=1e30) made NaN images that the uint8 conversion turned
    all-black without a word (fixed-step solvers); an adaptive solver rejects every step, and its step-cap line now
    names the guidance too."""
    run = lambda solver: sample(Overflowing(), np.array([1, 2], np.int32), jax.random.PRNGKey(0), null_cond=0,
                                shape=(2,), sampler_cfg=sampler_cfg(solver=solver, steps=8, cfg_scale=2.0))
    for solver in ("euler", "heun"):
        with pytest.raises(UserError, match=r"non-finite images \(2 of 2 in this chunk\) with cfg_scale=2.0"):
            run(solver)
    with pytest.raises(UserError, match="needed more than .* the velocity may not be finite"):
        run("tsit5")


def test_autoguidance_from_the_same_run_needs_an_earlier_step():
    from training.generate import check_weak_step

    auto = lambda **kw: OmegaConf.create({"guidance": "auto", "guide_step": None, "guide_fraction": 0.5, **kw})
    tc = OmegaConf.create({"steps": 16})
    check_weak_step(auto(), tc, 16)                         # step 8 of 16
    check_weak_step(auto(guide_step=3), tc, 4)
    check_weak_step(OmegaConf.create({"guidance": "cfg"}), tc, 1)
    check_weak_step(auto(guide_step=8, guide_ckpt_dir="/other/run"), tc, 4)   # another run: weaker by itself
    for sampler, step in ((auto(guide_step=8), 4), (auto(guide_step=4), 4), (auto(), 8)):
        with pytest.raises(UserError, match=f"is not before the sampled step {step}: pass guide_step=.*guidance=cfg"):
            check_weak_step(sampler, tc, step)


def test_balanced_labels():
    y = balanced_labels(25, 10)
    assert np.bincount(y).tolist() == [3] * 5 + [2] * 5 and (np.diff(y) >= 0).all()



@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a command-line process (pytest-xdist workers run with SIGINT ignored)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_is_held_until_the_running_call_returns(monkeypatch, python_sigint):
    """A Ctrl-C (SIGINT) that lands while a compiled call runs is raised between calls: the running chunk finishes,
    no further chunk starts, and the handler is given back; a second Ctrl-C raises at once; a handler installed by
    someone else (the training loop's) is left alone."""
    import os
    import signal

    import training.sampling
    from training.interrupts import DeferredInterrupt

    with DeferredInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.pending            # held, not raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with DeferredInterrupt():
            os.kill(os.getpid(), signal.SIGINT)   # held to the end of the block, then raised
    mine = lambda *a: None
    signal.signal(signal.SIGINT, mine)
    with DeferredInterrupt():
        assert signal.getsignal(signal.SIGINT) is mine
    signal.signal(signal.SIGINT, signal.default_int_handler)

    calls = []
    real_solve = training.sampling.solve

    def solve_then_ctrl_c(*a, **kw):
        x, result = real_solve(*a, **kw)
        # one Ctrl-C, at the first image's solve (vmapped: the callback runs once per image of the chunk)
        ctrl_c = lambda x: calls.append(1) or (len(calls) == 1 and os.kill(os.getpid(), signal.SIGINT))
        return jax.debug.callback(ctrl_c, x[0, 0]) or x, result
    monkeypatch.setattr(training.sampling, "solve", solve_then_ctrl_c)
    # An empty cache of compiled samplers for this test alone: one compiled earlier would not trace the patched solve,
    # and the one compiled here leaves with the patch.
    monkeypatch.setattr(training.sampling, "_chunk_sampler",
                        functools.lru_cache(maxsize=4)(training.sampling._chunk_sampler.__wrapped__))
    cfg = compose("config", ["model=tiny"])
    model = build_model(model_spec(cfg.model, {"shape": [8, 8, 1], "num_classes": 10}), key=jax.random.PRNGKey(0))
    with pytest.raises(KeyboardInterrupt):
        sample(model, balanced_labels(9, 10), jax.random.PRNGKey(0), null_cond=10, shape=(8, 8, 1),
               sampler_cfg=sampler_cfg(steps=2, chunk=3))
    # the running chunk's 3 solves (one per image, vmapped) finished; the chunks after it never started
    assert len(calls) == 3 and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # Host work between compiled calls (a chunk's VAE decode: minutes for an SD-sized VAE on CPU) stops at once
    monkeypatch.setattr(training.sampling, "solve", real_solve)
    decoded = []

    def decode(x):   # decodes image by image, as a VAE does batch by batch; Ctrl-C after the first
        for i, im in enumerate(x):
            decoded.append(i)
            if i == 0:
                os.kill(os.getpid(), signal.SIGINT)
        return x
    with pytest.raises(KeyboardInterrupt):
        sample(model, balanced_labels(9, 10), jax.random.PRNGKey(0), null_cond=10, shape=(8, 8, 1),
               sampler_cfg=sampler_cfg(steps=2, chunk=3), finish=decode)
    assert decoded == [0]   # held, it decoded the chunk's other two images first
    with DeferredInterrupt() as stop:   # a Ctrl-C held from a compiled call raises when the host work begins
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt), stop.immediate():
            decoded.append("never")
    assert decoded == [0]


def test_sample_grids_replace_their_png_whole_or_not_at_all(tmp_path, monkeypatch):
    """The PNG grids (training's samples/, sample.py's beside the npz) go through the same temporary-then-rename
    write: a save cut short leaves the grid that was there."""
    from PIL import Image

    from training.tracking import save_png

    out = tmp_path / "grid.png"
    save_png(np.zeros((4, 4, 1), np.uint8), out)
    before = out.read_bytes()
    real = Image.Image.save

    def cut_short(self, fp, *a, **k):
        open(fp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_png(np.full((4, 4, 1), 255, np.uint8), out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    monkeypatch.setattr(Image.Image, "save", real)
    save_png(np.full((4, 4, 1), 255, np.uint8), out)
    assert np.asarray(Image.open(out)).min() == 255


def test_sample_grids_of_many_classes_stay_small():
    """A grid has a row per class; for ImageNet's 1000 classes that was 8000 samples (each decoded by the VAE) every
    sample_every steps. Above GRID_CLASSES classes the rows are that many classes spread over all of them."""
    from training.generate import GRID_CLASSES, grid_labels

    few = grid_labels(10)
    assert len(few) == 80 and sorted(set(few.tolist())) == list(range(10))
    many = grid_labels(1000)
    rows = many.reshape(GRID_CLASSES, 8)
    assert len(many) == 8 * GRID_CLASSES and (rows == rows[:, :1]).all()
    assert rows[0, 0] == 0 and rows[-1, 0] == 999 and len(set(rows[:, 0].tolist())) == GRID_CLASSES


def test_sample_grid_shows_classes_spread_over_the_request():
    """sample.py's PNG took the first 256 of the class-sorted samples: 1000 Fashion-MNIST samples showed classes 0-2
    only, 50k ImageNet samples classes 0-5 of 1000. Now one row per class, spread evenly; small requests in full."""
    from training.tracking import grid_pick, grid_upscale

    labels = balanced_labels(1000, 10)
    idx, nrow = grid_pick(labels)
    assert nrow == 16 and len(idx) == 160
    assert labels[idx].reshape(10, 16).tolist() == [[c] * 16 for c in range(10)]
    labels = balanced_labels(50_000, 1000)
    idx, nrow = grid_pick(labels)
    rows = labels[idx].reshape(16, nrow)
    assert (rows == rows[:, :1]).all() and rows[0, 0] == 0 and rows[-1, 0] == 999 and len(set(rows[:, 0])) == 16
    idx, nrow = grid_pick(balanced_labels(100, 10))      # everything, in order, 10 to a row
    assert idx.tolist() == list(range(100)) and nrow == 10
    for labels in (balanced_labels(1000, 1000), np.array([3] * 300 + [5] * 2)):   # too few of a class for rows:
        idx, nrow = grid_pick(labels)                                              # 256 spread over the request
        assert nrow == 16 and len(idx) == 256 and idx[0] == 0 and idx[-1] == len(labels) - 1
    assert len(set(balanced_labels(1000, 1000)[grid_pick(balanced_labels(1000, 1000))[0]])) == 256
    assert grid_upscale(28) == 2 and grid_upscale(256) == 1
