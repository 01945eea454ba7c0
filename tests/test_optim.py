"""The optimizers behind `optim=adamw` / `optim=muon`: which parameters each rule moves, and how."""

import equinox as eqx
import jax
import numpy as np
import pytest

from models import build_model, model_spec
from training.cli import compose
from training.errors import UserError
from training.optim import MuonDimensionNumbers, decay_mask, make_optimizer, muon_dims
from training.state import split_keys


def _first_update(optim: str, *extra: str):
    """One optimizer update from a fresh state on a fixed random gradient, with the lr at its peak (no warm-up)."""
    cfg = compose("config", ["model=tiny", "model.depth=2", f"optim={optim}", "optim.warmup_steps=0",
                             "optim.schedule=constant", "train.lr=1e-2", "optim.clip_norm=1e9", *extra])
    spec = model_spec(cfg.model, {"shape": [8, 8, 4], "num_classes": 10})
    params = eqx.filter(build_model(spec, key=split_keys(0)[0]), eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    # Columns scaled over a decade: an ill-conditioned gradient, as real ones are (a random one is nearly isotropic).
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape) * np.logspace(0, -1, a.shape[-1])
                                         for k, a in zip(keys, leaves)])
    opt, _ = make_optimizer(cfg.train, cfg.optim)
    # jitted: one compile instead of hundreds of op-by-op ones (the Newton-Schulz loop), the same arithmetic
    updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    return cfg.optim, grads, updates


@pytest.mark.parametrize("extra", [(), ("optim.muon_modulation=false",)])
def test_muon_orthogonalises_block_matrices_and_leaves_the_rest_to_adamw(extra):
    # Without weight decay, so that Adam's first step is its bare sign step (decay: the test below).
    optim, grads, updates = _first_update("muon", "optim.weight_decay=0", *extra)
    w = np.asarray(updates.blocks.mlp.fc1.weight)   # (depth, in, out): one Newton-Schulz per block
    assert w.ndim == 3
    for i in range(w.shape[0]):
        s = np.linalg.svd(w[i], compute_uv=False)
        # Orthogonalised: all singular values alike (Muon's quintic iteration lands them in ~[0.7, 1.2] x scale)...
        assert s.min() > 0.5 * s.max(), s
        # ...while the raw random gradient's spread is wide (so this would fail if Muon had been skipped).
        g = np.linalg.svd(np.asarray(grads.blocks.mlp.fc1.weight[i]), compute_uv=False)
        assert g.min() < 0.3 * g.max()
        # Scaled to AdamW's update RMS (0.2) x Muon's learning rate.
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(w[i]))), 0.2 * optim.muon_lr_ratio * 1e-2, rtol=0.35)
    # Not a block matrix -> Adam (Nesterov's, as optax's muon uses), whose first step is one size for every entry,
    # against the gradient's sign: (1 + b1) x lr / (1 + 0.9 b1 ...) -- nothing like the orthogonalised update.
    adam = [(updates.patch_embed, grads.patch_embed), (updates.final, grads.final)]   # (update, gradient)
    if not optim.muon_modulation:   # the adaLN maps left to Adam
        adam.append((updates.blocks.ada, grads.blocks.ada))
    else:                           # ...or orthogonalised with the rest (entries of many sizes)
        a = np.abs(np.asarray(updates.blocks.ada.weight))
        assert a.min() < 0.5 * a.max()
    for upd, grad in adam:
        u, g = np.asarray(upd.weight), np.asarray(grad.weight)
        np.testing.assert_array_equal(np.sign(u), -np.sign(g))
        np.testing.assert_allclose(np.abs(u), np.abs(u).max(), rtol=1e-2)   # eps shows on tiny entries
        assert 1e-2 <= np.abs(u).max() <= 2e-2


def test_adamw_moves_every_parameter_by_its_sign_at_the_first_step():
    _, grads, updates = _first_update("adamw", "optim.weight_decay=0")
    u, g = np.asarray(updates.blocks.mlp.fc1.weight), np.asarray(grads.blocks.mlp.fc1.weight)
    np.testing.assert_allclose(u, -1e-2 * np.sign(g), rtol=1e-2)   # eps shows on tiny entries


@pytest.mark.parametrize("optim,adam_decay", [("adamw", None), ("muon", "all"), ("muon", "matrices")])
def test_weight_decay_reaches_the_parameters_it_is_documented_for(optim, adam_decay):
    """Decoupled decay adds -lr x wd x param to the update. AdamW: matrices only (decay_mask). Muon: its matrices at
    Muon's lr, and with muon_adam_decay=all *every* Adam-handled parameter at train.lr, biases, norm
    scales and embeddings included (optax's muon applies adam_weight_decay without a mask); =matrices (default): as AdamW."""
    wd, lr = 0.1, 1e-2
    extra = [f"optim.muon_adam_decay={adam_decay}"] if adam_decay else []
    _, _, plain = _first_update(optim, "optim.weight_decay=0", *extra)
    cfg, _, decayed = _first_update(optim, f"optim.weight_decay={wd}", *extra)
    spec = model_spec(compose("config", ["model=tiny", "model.depth=2"]).model, {"shape": [8, 8, 4], "num_classes": 10})
    params = eqx.filter(build_model(spec, key=split_keys(0)[0]), eqx.is_inexact_array)
    mask = jax.tree.leaves(decay_mask(params))
    on_muon = [d is not None for d in jax.tree.leaves(muon_dims(params, bool(cfg.get("muon_modulation", True))),
                                                       is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))]
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
    decayed_names = []
    for name, p, a, b, m, mu in zip(paths, jax.tree.leaves(params), jax.tree.leaves(plain), jax.tree.leaves(decayed),
                                    mask, on_muon):
        if not np.any(np.asarray(p)):
            continue   # zero-initialised: decay is invisible
        if mu and optim == "muon":
            expect = wd * lr * cfg.muon_lr_ratio
        else:
            expect = wd * lr * (1.0 if adam_decay == "all" else m)
        np.testing.assert_allclose(np.asarray(a) - np.asarray(b), expect * np.asarray(p), rtol=1e-3, atol=1e-8,
                                   err_msg=name)
        if expect:
            decayed_names.append(name)
    assert any("blocks" in n for n in decayed_names) and any("patch_embed" in n for n in decayed_names)
    if adam_decay != "all":
        assert not any(n.endswith("bias") or "scale" in n or "y_embed" in n for n in decayed_names), decayed_names
    else:
        assert any("y_embed" in n for n in decayed_names) and any("q_scale" in n for n in decayed_names)


def test_unknown_optimizer_is_one_line():
    with pytest.raises(Exception) as e:
        compose("config", ["optim=sgd"])
    assert "optim" in str(e.value)
    cfg = compose("config", ["optim=muon"])
    cfg.optim.name = "lion"
    with pytest.raises((ValueError, UserError), match="adamw | muon"):
        make_optimizer(cfg.train, cfg.optim)


def test_decay_mask_decays_matrices_not_stacked_block_vectors():
    """Stage 2's per-block vectors are (depth, k): the depth axis is not a matrix axis, so adaLN-single's tables, the
    joint blocks' text gain and the learned null caption get no weight decay; every matrix still does, and stage 1's
    mask is the one its measured runs used (the same ten matrices)."""
    from training.cli import compose as comp

    def mask_of(config, overrides, meta):
        spec = model_spec(comp(config, overrides).model, meta)
        params = eqx.filter(build_model(spec, key=split_keys(0)[0]), eqx.is_inexact_array)
        return {jax.tree_util.keystr(k): (m, a.shape) for (k, a), m in
                zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(decay_mask(params)))}

    s1 = mask_of("config", [], {"shape": [28, 28, 1], "num_classes": 10})   # the default run: small, Fashion-MNIST
    assert sorted(k for k, (m, _) in s1.items() if m) == sorted(
        [".patch_embed.weight", ".t_mlp1.weight", ".t_mlp2.weight", ".final_ada.weight", ".final.weight"]
        + [f".blocks.{n}.weight" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "ada")])
    text = {"shape": [8, 8, 3], "num_classes": 10, "text": {"dim": 16, "max_tokens": 4}}
    for mixing in ("cross", "joint"):
        s2 = mask_of("stage2", [f"model.mixing={mixing}", "model.depth=2", "model.hidden_size=32",
                                "model.num_heads=2"], text)
        vectors = [".blocks.table", ".null_text"] + \
            ([".blocks.txt_table", ".blocks.txt_gain"] if mixing == "joint" else [])
        for k in vectors:
            assert k in s2 and not s2[k][0], (k, s2.get(k))
        matrices = [k for k, (_, shape) in s2.items() if k.endswith(".weight")]
        assert matrices and all(s2[k][0] for k in matrices), s2
        assert all(not m for k, (m, shape) in s2.items() if k.startswith(".blocks.") and len(shape) < 3)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_zero_means_no_warmup_and_the_default_keeps_its_schedule(schedule):
    import optax
    from omegaconf import OmegaConf

    from training.optim import lr_schedule

    cfg = compose("config", [f"optim.schedule={schedule}"])
    no_warmup = lr_schedule(1.0, 100, OmegaConf.merge(cfg.optim, {"warmup_steps": 0}))
    assert float(no_warmup(0)) == 1.0 and float(no_warmup(1)) > 0.99
    assert float(no_warmup(100)) == pytest.approx(1.0 if schedule == "constant" else cfg.optim.min_lr_ratio)
    if schedule == "cosine":   # the default (warm-up 200 of 1600 steps): the schedule the measured runs used
        lr, steps, w = float(cfg.train.lr), int(cfg.train.steps), int(cfg.optim.warmup_steps)
        ref = optax.warmup_cosine_decay_schedule(0.0, lr, w, steps, end_value=lr * float(cfg.optim.min_lr_ratio))
        got = lr_schedule(lr, steps, cfg.optim)
        t = np.arange(0, steps + 50, 7)
        np.testing.assert_array_equal(jax.vmap(got)(t), jax.vmap(ref)(t))
        assert float(got(0)) == 0.0
    if schedule == "wsd":   # flat at lr after the warm-up until the last decay_frac, then 1 - sqrt down to the floor
        cfg.optim.decay_frac = 0.25
        got, low = lr_schedule(2.0, 400, cfg.optim), 2.0 * cfg.optim.min_lr_ratio
        assert float(got(100)) == pytest.approx(1.0)     # half-way up the 200-step warm-up
        assert [float(got(s)) for s in (200, 250, 300)] == [2.0, 2.0, 2.0]
        assert float(got(350)) == pytest.approx(low + (2.0 - low) * (1 - 0.5 ** 0.5))
        assert float(got(400)) == pytest.approx(low) and float(got(500)) == pytest.approx(low)
    with pytest.raises(UserError, match="warmup_steps"):
        lr_schedule(1.0, 100, OmegaConf.merge(cfg.optim, {"warmup_steps": -1}))


@pytest.mark.parametrize("steps", [3, 5])
def test_gram_newton_schulz_is_optaxs_iteration_in_fewer_flops(steps):
    """training/newton_schulz.py runs Muon's Newton-Schulz on m x m Gram matrices: the same iterates as optax's to
    float32 rounding, for wide, tall, square and stacked (depth, in, out) matrices, in fewer flops where n >= 2m."""
    import jax.numpy as jnp
    from optax.contrib import _muon

    from training.newton_schulz import _DIRECT, orthogonalize

    coeffs = jnp.asarray(_muon._DEFAULT_NS_COEFFS)
    stacked = MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,))
    cases = [((48, 192), None), ((192, 48), None), ((64, 64), None), ((3, 32, 128), stacked)]
    for i, (shape, dims) in enumerate(cases):
        x = jax.random.normal(jax.random.PRNGKey(i), shape) * np.logspace(0, -2, shape[-1])
        ours, ref = (jax.jit(lambda x, f=f: f(x, coeffs, steps, "frobenius", 1e-8, dims)) for f in (orthogonalize,
                                                                                                      _DIRECT))
        np.testing.assert_allclose(ours(x), ref(x), rtol=0, atol=2e-5 * float(jnp.abs(ref(x)).max()))
    x = jnp.ones((192, 768))
    flops = [jax.jit(lambda x, f=f: f(x, coeffs, steps)).lower(x).compile().cost_analysis()["flops"]
             for f in (orthogonalize, _DIRECT)]
    # (4m^2n + (8s - 6)m^3) / s(4m^2n + 2m^3) at n = 4m: 0.63 for 3 steps, 0.55 for 5
    assert flops[0] < 0.7 * flops[1], flops


def test_muon_optimizer_uses_the_gram_iteration_and_puts_optaxs_back(monkeypatch):
    from optax.contrib import _muon

    import training.newton_schulz as ns
    from training import optim

    calls = []
    monkeypatch.setattr(ns, "_orthogonalize_2d", lambda *a, f=ns._orthogonalize_2d: calls.append(1) or f(*a))
    _, _, updates = _first_update("muon")
    assert calls, "Muon's update did not go through training/newton_schulz.py"
    assert _muon.orthogonalize_via_newton_schulz is ns._DIRECT   # optax's own again once traced
    monkeypatch.setattr(optim, "gram_muon", lambda tx: tx)        # optax's Muon as it ships
    _, _, plain = _first_update("muon")
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()) + 1e-12)
