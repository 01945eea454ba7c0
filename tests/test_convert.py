"""Stage 1 -> stage 2 transplant: right after init, with the null caption, stage 2 computes what stage 1 computed
for the null class (at the fold time t*), for both mixing modes; and train.init_from loads a real stage-1 run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import build_model
from models.convert import load_stage1, stage1_to_stage2
from stage2_helpers import prepare_digits_text, stage2_overrides

BASE = dict(name="t", hidden_size=32, depth=3, num_heads=4, patch_size=2, mlp_ratio=4.0, input_size=[8, 8],
            in_channels=3, num_classes=5)


def trained_like(model, seed=1, scale=0.1):
    """A stage-1 model whose zero-initialised parts (adaLN, output layer) are non-zero, as after training."""
    leaves, tdef = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tdef, [a + scale * jax.random.normal(k, a.shape) if eqx_float(a) else a
                                     for a, k in zip(leaves, keys)])


def eqx_float(a):
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


@pytest.mark.parametrize("mixing", ["cross", "joint"])
def test_init_reproduces_stage1_null_class(mixing):
    s1 = trained_like(build_model(BASE, key=jax.random.PRNGKey(0)))
    s2 = build_model({**BASE, "mixing": mixing, "text_dim": 12, "max_tokens": 6}, key=jax.random.PRNGKey(3))
    t_star = 0.3
    s2 = stage1_to_stage2(s1, s2, t_star)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    t = jnp.full((4,), t_star)
    text = jax.random.normal(jax.random.PRNGKey(4), (4, 6, 12))
    mask = jnp.array([[1, 1, 1, 0, 0, 0]] * 4, bool)
    want = jax.vmap(s1)(x, t, jnp.full((4,), BASE["num_classes"]))
    null = jax.vmap(s2)(x, t, text, mask, jnp.ones((4,), bool))
    assert float(jnp.abs(want).max()) > 0.5  # a non-trivial function
    np.testing.assert_allclose(null, want, atol=2e-5, rtol=1e-5)
    # The new text parts start at values that add nothing: a real caption gives the same output too.
    np.testing.assert_allclose(jax.vmap(s2)(x, t, text, mask, jnp.zeros((4,), bool)), want, atol=2e-5, rtol=1e-5)
    # Every block's attention/MLP and the output layer really are the stage-1 ones (the seed copied none of them).
    np.testing.assert_array_equal(s2.blocks.attn.qkv.weight, s1.blocks.attn.qkv.weight)
    np.testing.assert_array_equal(s2.final.weight, s1.final.weight)
    # A different class gives a different stage-1 output, so the check above is specific to the null class.
    other = jax.vmap(s1)(x, t, jnp.zeros((4,), jnp.int32))
    assert float(jnp.abs(other - want).max()) > 1e-3


def test_seed_fold_bugs_would_fail():
    """The seed's fold (no SiLU, E = S_bar - S_i) breaks the equality: the test above does detect those bugs."""
    s1 = trained_like(build_model(BASE, key=jax.random.PRNGKey(0)))
    s2 = stage1_to_stage2(s1, build_model({**BASE, "mixing": "cross", "text_dim": 12, "max_tokens": 6},
                                          key=jax.random.PRNGKey(3)), 0.5)
    bad = jax.tree_util.tree_map(lambda a: a, s2)
    import equinox as eqx
    bad = eqx.tree_at(lambda m: m.blocks.table, bad, -s2.blocks.table)  # the sign error
    x, t = jax.random.normal(jax.random.PRNGKey(2), (8, 8, 3)), jnp.float32(0.5)
    text, mask = jnp.zeros((6, 12)), jnp.ones((6,), bool)
    want = s1(x, t, jnp.int32(BASE["num_classes"]))
    assert float(jnp.abs(bad(x, t, text, mask, True) - want).max()) > 1e-3
    np.testing.assert_allclose(s2(x, t, text, mask, True), want, atol=2e-5)


@pytest.mark.parametrize("mixing", ["cross", "joint"])
def test_a_stage1_run_with_other_heads_is_refused(mixing):
    """Same width, other heads: the copied attention would keep stage 1's head count under a spec that names stage 2's
    (cross) or fail to broadcast its QK-norm scales (joint). One line instead; the kernel choice stays stage 2's."""
    from training.errors import UserError

    text = {"mixing": mixing, "text_dim": 12, "max_tokens": 6}
    s1 = build_model({**BASE, "num_heads": 2}, key=jax.random.PRNGKey(0))
    with pytest.raises(UserError, match=r"num_heads: stage 1 2 vs stage 2 4; head dim: stage 1 16 vs stage 2 8"):
        stage1_to_stage2(s1, build_model({**BASE, **text}, key=jax.random.PRNGKey(3)))
    s1 = build_model({**BASE, "attention_impl": "xla"}, key=jax.random.PRNGKey(0))
    s2 = stage1_to_stage2(s1, build_model({**BASE, **text, "attention_impl": "auto"}, key=jax.random.PRNGKey(3)))
    assert s2.blocks.attn.impl == "auto" and s2.blocks.attn.num_heads == 4


def test_init_from_a_stage1_checkpoint(digits_text_root, digits_root, tmp_path):
    import train_stage1
    import train_stage2
    from conftest import tiny_overrides
    from training.cli import compose
    from training.checkpoint import Checkpointer, read_config

    s1_dir, s2_dir = str(tmp_path / "s1"), str(tmp_path / "s2")
    train_stage1.main(compose("config", tiny_overrides(digits_root, s1_dir, steps=2)))
    s1, spec1 = load_stage1(s1_dir)
    over = stage2_overrides(digits_text_root, s2_dir, steps=3, **{"train.init_from": s1_dir, "train.lr": 1e-12,
                                                                   "train.init_fold_t": 0.5})
    train_stage2.main(compose("stage2", over))
    saved, step = read_config(s2_dir)
    template = build_model(saved["model_spec"], key=jax.random.PRNGKey(0))
    with Checkpointer(s2_dir, create=False) as ck:
        s2 = ck.restore_weights(template, step)
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 8, 1))
    t = jnp.float32(0.5)
    want = s1(x, t, jnp.int32(spec1["num_classes"]))
    got = s2(x, t, jnp.zeros((8, 384)), jnp.ones((8,), bool), jnp.bool_(True))
    # lr 1e-12 for three steps: the saved stage-2 weights are the transplanted ones up to ~1e-12.
    np.testing.assert_allclose(got, want, atol=1e-4)
    # A stage-1 run that predicts another quantity was copied in without a word (its outputs read as the other one).
    from training.errors import UserError

    other = {"x": "v", "v": "x"}[str(saved["train"]["prediction"])]
    with pytest.raises(UserError, match=rf"train.prediction={saved['train']['prediction']}, and this run uses {other}"):
        train_stage2.main(compose("stage2", stage2_overrides(digits_text_root, str(tmp_path / "s2b"), steps=3, **{
            "train.init_from": s1_dir, "train.prediction": other})))


def test_init_from_a_stage2_run_fine_tunes_it(digits_text_root, tmp_path):
    """train.init_from took only stage-1 runs: fine-tuning a stage-2 model on another captioned set (the PixArt user's
    first step) meant training from scratch. A stage-2 run's EMA is now copied whole; another architecture or text
    encoder is refused in one line."""
    import equinox as eqx

    import train_stage2
    from models.convert import copy_stage2, load_init
    from training.cli import compose
    from training.errors import UserError

    def ema(ckpt_dir):   # the run's EMA and saved config, as train.init_from reads them
        model, _, saved = load_init(ckpt_dir)
        return model, saved

    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    train_stage2.main(compose("stage2", stage2_overrides(digits_text_root, a_dir, steps=3)))
    train_stage2.main(compose("stage2", stage2_overrides(digits_text_root, b_dir, steps=3, **{
        "train.init_from": a_dir, "train.lr": 1e-12, "train.seed": 7})))
    (a, saved), (b, _) = ema(a_dir), ema(b_dir)
    assert float(jnp.abs(a.final.weight).max()) > 0   # zero at init: trained weights, not a fresh model's
    for x, y in zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array))):
        np.testing.assert_allclose(y, x, atol=1e-7)   # lr 1e-12 for three steps: B's EMA is A's
    mismatch = r"stage-2 model \(model.hidden_size: run 32 vs now 64\): pass the run's values"
    with pytest.raises(UserError, match=mismatch):
        train_stage2.main(compose("stage2", stage2_overrides(digits_text_root, str(tmp_path / "c"), steps=3, **{
            "train.init_from": a_dir, "model.hidden_size": 64})))
    spec = saved["model_spec"]
    other = {**saved, "data_identity": {"text": {"encoder": "t5gemma"}}}
    with pytest.raises(UserError, match=r"another text encoder \(encoder: run t5gemma vs now minilm\)"):
        copy_stage2(a, build_model(spec, key=jax.random.PRNGKey(1)), other, spec, {"text": {"encoder": "minilm"}}, "a")
    with pytest.raises(UserError, match="trained on pixels, and this data set holds latents of the VAE /v"):
        copy_stage2(a, build_model(spec, key=jax.random.PRNGKey(1)), saved, spec,
                    {"text": {"encoder": "minilm"}, "encoder": {"vae": "/v"}}, "a")
    with pytest.raises(UserError, match="is a stage-2 .* not a stage-1 one"):
        load_stage1(a_dir)


def test_a_missing_init_from_names_the_key(tmp_path):
    """It used to say 'pass ckpt_dir=<dir of a run>', sample.py's key, to a user who had typed train.init_from."""
    from training.errors import UserError

    with pytest.raises(UserError, match=r"train.init_from=.*no directory.*train.ckpt_dir of a stage-1 or stage-2 run"):
        load_stage1(str(tmp_path / "absent"))


@pytest.fixture(scope="session")
def digits_text_root(tmp_path_factory):
    return prepare_digits_text(str(tmp_path_factory.mktemp("text")))
