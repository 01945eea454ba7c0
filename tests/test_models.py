import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import apply, build_model, forward_flops, model_spec
from models.layers import patchify, sincos_pos_embed_2d, unpatchify
from training.cli import compose
from training.errors import UserError

META = {"shape": [8, 8, 1], "num_classes": 10}


def spec_for(preset: str, meta=META, **over):
    cfg = compose("config", [f"model={preset}"] + [f"model.{k}={v}" for k, v in over.items()])
    return model_spec(cfg.model, meta)


def test_shapes_and_zero_output_at_init():
    spec = spec_for("tiny")
    model = build_model(spec, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    fwd = eqx.filter_jit(lambda m, *a: jax.vmap(m)(*a))   # jitted: one compile, not one per op
    out = fwd(model, x, jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 3, 10]))  # 10 = null class
    assert out.shape == x.shape
    assert float(jnp.abs(out).max()) == 0.0  # adaLN-Zero + zero output layer: the untrained net predicts 0
    # ...but gradients flow into the output layer, so the network is not stuck at zero.
    loss = lambda m: jnp.sum(jax.vmap(m)(x, jnp.full(3, 0.5), jnp.zeros(3, jnp.int32)) * x)
    g = eqx.filter_jit(jax.grad(loss))(model)
    assert float(jnp.abs(g.final.weight).max()) > 0


def test_conditioning_changes_output_once_trained_weights_are_nonzero():
    spec = spec_for("tiny")
    model = build_model(spec, key=jax.random.PRNGKey(0))
    # Perturb the zero-initialised layers, as training does, and check t and y both matter.
    perturb = lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape)
    model = jax.tree.map(perturb, model)
    x = jnp.ones((8, 8, 1))
    base = model(x, jnp.float32(0.3), jnp.int32(1))
    assert not np.allclose(base, model(x, jnp.float32(0.7), jnp.int32(1)))
    assert not np.allclose(base, model(x, jnp.float32(0.3), jnp.int32(2)))


def test_scan_equals_unrolled_and_remat():
    spec = spec_for("tiny")
    m_scan = jax.tree.map(lambda a: a + 0.05, build_model(spec, key=jax.random.PRNGKey(0)))
    x, t, y = jnp.ones((8, 8, 1)), jnp.float32(0.4), jnp.int32(2)
    ref = m_scan(x, t, y)
    for over in ({"scan_blocks": False}, {"remat": True}):
        other = jax.tree.map(lambda a: a + 0.05, build_model({**spec, **over}, key=jax.random.PRNGKey(0)))
        np.testing.assert_allclose(other(x, t, y), ref, rtol=1e-5, atol=1e-6)
    # remat changes only what the backward pass keeps, so the gradients must agree too, for each policy
    grad = lambda m: eqx.filter_grad(lambda m: jnp.sum(m(x, t, y) ** 2))(m)
    g_ref = jax.tree.leaves(grad(m_scan))
    for remat in (True, "dots"):
        other = jax.tree.map(lambda a: a + 0.05, build_model({**spec, "remat": remat}, key=jax.random.PRNGKey(0)))
        for a, b in zip(jax.tree.leaves(grad(other)), g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="model.remat"):
        build_model({**spec, "remat": "some"}, key=jax.random.PRNGKey(0))(x, t, y)


def test_whole_batch_call_equals_one_example_at_a_time():
    """The DiT takes a batch directly (models.apply: 2-D matmuls, faster on CPU); it must compute what the model does
    for each example alone, with per-example or shared times, and under vmap too."""
    spec = spec_for("tiny", scan_blocks=True)
    model = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape),
                         build_model(spec, key=jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
    t, y = jnp.linspace(0.1, 0.9, 5), jnp.array([0, 3, 10, 7, 1])
    one_by_one = np.stack([model(x[i], t[i], y[i]) for i in range(5)])
    np.testing.assert_allclose(apply(model, x, t, y), one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(model)(x, t, y), one_by_one, rtol=1e-5, atol=1e-5)
    shared = np.stack([model(x[i], t[2], y[i]) for i in range(5)])
    np.testing.assert_allclose(apply(model, x, t[2], y), shared, rtol=1e-5, atol=1e-5)
    assert not np.allclose(shared, one_by_one)   # the times do reach the examples


@pytest.mark.parametrize("mixing", ["cross", "joint"])
def test_text_model_whole_batch_equals_one_example_at_a_time(mixing):
    """The same for the text DiT: per-example captions, padding masks and null-caption flags must stay per example."""
    spec = dict(name="t", hidden_size=32, depth=2, num_heads=4, patch_size=2, mlp_ratio=4.0, input_size=[8, 8],
                in_channels=3, num_classes=None, mixing=mixing, text_dim=12, max_tokens=6, scan_blocks=True)
    model = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(3), a.shape)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a, build_model(spec, key=jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    t = jnp.array([0.1, 0.4, 0.6, 0.9])
    text = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 12))
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    drop = jnp.array([False, True, False, False])
    one_by_one = np.stack([model(x[i], t[i], text[i], mask[i], drop[i]) for i in range(4)])
    np.testing.assert_allclose(apply(model, x, t, text, mask, drop), one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(model)(x, t, text, mask, drop), one_by_one, rtol=1e-5, atol=1e-5)


def test_patchify_round_trip():
    x = jnp.arange(8 * 8 * 3, dtype=jnp.float32).reshape(8, 8, 3)
    np.testing.assert_array_equal(unpatchify(patchify(x, 2), 2, 8, 8, 3), x)
    assert patchify(x, 4).shape == (4, 48)


def test_pos_embed_distinguishes_positions():
    e = sincos_pos_embed_2d(32, 4, 4)
    assert e.shape == (16, 32)
    assert len({tuple(np.round(r, 5)) for r in e}) == 16


@pytest.mark.parametrize("preset,params_m,gmacs", [("S-2", 33.0, 6.06), ("B-2", 130.5, 23.01), ("XL-2", 675.1, 118.6)])
def test_dit_family_matches_paper(preset, params_m, gmacs):
    """DiT paper, Table 1 (ImageNet 256: 32x32x4 latents, 1000 classes). The paper's Gflops count multiply-adds."""
    spec = spec_for(preset, {"shape": [32, 32, 4], "num_classes": 1000})
    shapes = jax.eval_shape(lambda: build_model(spec, key=jax.random.PRNGKey(0)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert abs(n / 1e6 - params_m) / params_m < 0.02
    assert abs(forward_flops(spec)["forward_flops"] / 2e9 - gmacs) / gmacs < 0.03


def test_bad_patch_size_is_a_user_error():
    with pytest.raises(UserError, match="patch"):
        spec_for("small", {"shape": [30, 30, 1], "num_classes": 10})  # 30 is not divisible by patch 4


def test_a_saved_spec_with_a_key_this_code_does_not_build_is_one_user_error():
    """sample.py rebuilds the model from the checkpoint's saved spec; a key written by another version of the code
    (this session's own SwiGLU experiment left `mlp` in its runs' specs) must be named, not a TypeError."""
    spec = spec_for("tiny")
    with pytest.raises(UserError, match=r"names mlp, which this code's DiT does not build.*another version"):
        build_model({**spec, "mlp": "swiglu"}, key=jax.random.PRNGKey(0))
    build_model({**spec, "name": "anything"}, key=jax.random.PRNGKey(0))   # the preset's name is not an argument


def test_attention_auto_and_large_presets():
    """`attention_impl: auto` (the DiT presets' setting) picks cuDNN only on a GPU in bf16/fp16 without a mask, and
    computes what XLA computes elsewhere; bad values of remat / attention_impl are one-line errors."""
    from models.layers import attention_kernel

    q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
    assert attention_kernel("auto", q, None) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert attention_kernel("auto", q.astype(jnp.float32), None) == "xla"
    assert attention_kernel("auto", q, jnp.ones((2, 1, 16, 16), bool)) == "xla"
    assert attention_kernel("auto", jnp.zeros((2, 16, 4, 72), jnp.bfloat16), None) == attention_kernel("auto", q, None)
    assert attention_kernel("auto", jnp.zeros((2, 16, 4, 36), jnp.bfloat16), None) == "xla"    # head dim not % 8
    assert attention_kernel("auto", jnp.zeros((2, 16, 4, 256), jnp.bfloat16), None) == "xla"   # head dim over 128
    assert attention_kernel("cudnn", q.astype(jnp.float32), None) == "cudnn"   # an explicit choice is kept
    spec = spec_for("tiny")
    x, t, y = jnp.ones((8, 8, 1)), jnp.float32(0.4), jnp.int32(2)
    outs = [jax.tree.map(lambda a: a + 0.05, build_model({**spec, "attention_impl": impl}, key=jax.random.PRNGKey(0)))
            (x, t, y) for impl in ("auto", "xla")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    big = spec_for("XL-2", meta={"shape": [32, 32, 4], "num_classes": 1000})
    assert big["remat"] == "dots" and big["attention_impl"] == "auto"
    for key, bad in (("remat", "some"), ("attention_impl", "flash")):
        with pytest.raises(UserError, match=f"model.{key}='{bad}' unknown"):
            spec_for("tiny", **{key: bad})


def test_token_routing_skips_the_routed_blocks_and_keeping_all_is_the_full_model():
    """TREAD routing (train.route): tokens outside `keep` bypass blocks start..end-1 unchanged; keeping every token
    in order is the ordinary forward pass."""
    spec = spec_for("tiny", scan_blocks=False, patch_size=2)   # 16 tokens
    model = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape),
                         build_model(spec, key=jax.random.PRNGKey(0)))
    depth = spec["depth"]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    t, y = jnp.array([0.3, 0.8]), jnp.array([1, 10])
    full = apply(model, x, t, y)
    every = jnp.tile(jnp.arange(16), (2, 1))
    np.testing.assert_allclose(apply(model, x, t, y, route=(0, depth, every)), full, rtol=1e-5, atol=1e-6)
    # Routed past every block, a dropped token's output patch depends on no block weight; a kept one does.
    keep = jnp.array([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])
    other = eqx.tree_at(lambda m: m.blocks, model, jax.tree.map(lambda a: a * 1.5, model.blocks))
    a = patchify(apply(model, x, t, y, route=(0, depth, keep)), 2)
    b = patchify(apply(other, x, t, y, route=(0, depth, keep)), 2)
    for i in range(2):
        dropped = np.setdiff1d(np.arange(16), np.asarray(keep[i]))
        np.testing.assert_allclose(a[i, dropped], b[i, dropped], rtol=1e-6, atol=1e-6)
        assert not np.allclose(a[i, keep[i]], b[i, keep[i]])
    # Routing a middle range changes the output (the routed blocks see fewer tokens), and the scan path agrees.
    mid = apply(model, x, t, y, route=(1, depth, keep))
    assert not np.allclose(mid, full)
    scanned = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape),
                           build_model({**spec, "scan_blocks": True}, key=jax.random.PRNGKey(0)))
    np.testing.assert_allclose(apply(scanned, x, t, y, route=(1, depth, keep)), mid, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token routing needs a model that takes the whole batch"):
        apply(lambda xx, tt, yy: xx, x, t, y, route=(0, depth, keep))   # a per-example model cannot route


def test_model_sizes_that_cannot_build_are_one_user_error():
    """Sizes the model cannot run with are named when the spec is made, not met at the first step as a
    ZeroDivisionError or the sin-cos embedding's assert."""
    for over, needle in (({"hidden_size": 30, "num_heads": 3}, "hidden_size=30 must be a multiple of 4"),
                         ({"hidden_size": 36, "num_heads": 8}, "hidden_size=36 is not divisible by model.num_heads=8"),
                         ({"num_heads": 0}, "num_heads=0 must be a whole number >= 1"),
                         ({"patch_size": 0}, "patch_size=0 must be a whole number >= 1"),
                         ({"hidden_size": 32.5}, "hidden_size=32.5 must be a whole number")):
        with pytest.raises(UserError, match=needle):
            spec_for("tiny", **over)
    assert spec_for("tiny", hidden_size=36, num_heads=3)["hidden_size"] == 36   # 12 per head, 36 % 4 == 0: fine


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a GPU has cuDNN: nothing to refuse")
def test_cudnn_attention_without_a_gpu():
    """A new run asking for cuDNN's kernel on a machine without one is refused up front; a GPU run's saved spec
    still builds here (to sample from) with XLA's kernel, which computes the same function."""
    with pytest.raises(UserError, match="attention_impl=cudnn needs a GPU.*use model.attention_impl=auto .* or xla"):
        spec_for("tiny", attention_impl="cudnn")
    spec = spec_for("tiny")
    model = build_model({**spec, "attention_impl": "cudnn"}, key=jax.random.PRNGKey(0))
    assert model.blocks.attn.impl == "xla"
    model = jax.tree.map(lambda a: a + 0.05, model)
    x, t, y = jnp.ones((8, 8, 1)), jnp.float32(0.4), jnp.int32(2)
    want = jax.tree.map(lambda a: a + 0.05, build_model(spec, key=jax.random.PRNGKey(0)))(x, t, y)
    np.testing.assert_allclose(model(x, t, y), want, rtol=1e-6, atol=1e-7)
