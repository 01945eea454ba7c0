"""Stage 2: exact resume, gradient accumulation == one large batch, masks respected, prompt sampling with CFG."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_stage2
from data.loader import load_text, make_iterator
from data.meta import load_meta
from models import build_model
from conftest import assert_same_state, restore_final
from stage2_helpers import prepare_digits_text, stage2_overrides
from training.checkpoint import read_config
from training.cli import compose
from training.generate import text_conds, text_null
from training.optim import make_optimizer
from training.sampling import sample
from training.state import init_state, split_keys
from training.step import make_train_step, text_conditioning

N = 3
SPEC = dict(name="t", hidden_size=32, depth=2, num_heads=2, patch_size=2, mlp_ratio=4.0, input_size=[8, 8],
            in_channels=1, num_classes=10, text_dim=384, max_tokens=8)


def perturbed(model, scale=0.2):
    leaves, tdef = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(tdef, [a + scale * jax.random.normal(k, a.shape) if jnp.issubdtype(a.dtype, jnp.floating)
                                     else a for a, k in zip(leaves, keys)])


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return prepare_digits_text(str(tmp_path_factory.mktemp("text")))


@pytest.mark.parametrize("mixing", ["joint"])  # the resume machinery is the same for both; joint has more parts
def test_stage2_resume_is_bitwise_exact(root, tmp_path, mixing, monkeypatch):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = {"train.lr": 3e-3, "model.mixing": mixing, "train.ckpt_every": N}
    train_stage2.main(compose("stage2", stage2_overrides(root, straight, steps=2 * N, **common)))
    r1 = train_stage2.main(compose("stage2", stage2_overrides(root, split, steps=2 * N, **common,
                                                              **{"train.stop_at_step": N})))
    assert r1["step"] == N and "stopped" in r1
    train_stage2.main(compose("stage2", stage2_overrides(root, split, steps=2 * N, **common,
                                                         **{"train.is_restore": True})))
    a, b = (restore_final(d, root) for d in (straight, split))
    assert int(a[0].step) == 2 * N
    assert set(a[1]) >= {"x", "text", "mask"} and a[1]["text"].shape == (32, 8, 384)
    assert_same_state(a, b)   # params, EMA, optimizer state, key, counters and the next batch, bitwise
    a = a[0]
    init = build_model(read_config(straight)[0]["model_spec"], key=split_keys(0)[0])
    assert not np.array_equal(np.asarray(init.null_text), np.asarray(a.params.null_text))  # the null caption learns
    # A re-check from the command line wrote over the run's own end-of-run result (eval-step<N>.json): now it is
    # named by its settings, and the run's file stays.
    from training import text_eval

    own = Path(straight) / f"eval-step{2 * N:07d}.json"
    own.write_text('{"the run": "its own result"}')
    real_topk, held = text_eval.caption_topk, []

    def topk(*a, **k):   # the set is held while it is read: a rebuild now is refused
        from data.rebuild import refuse_if_read
        from training.errors import UserError
        with pytest.raises(UserError, match="read"):
            refuse_if_read(Path(root) / "digits_text")
        held.append(True)
        return real_topk(*a, **k)
    monkeypatch.setattr(text_eval, "caption_topk", topk)
    res = text_eval.main([straight, "num_samples=4", "cfg_scale=2", "steps=2"])
    assert held and own.read_text() == '{"the run": "its own result"}'
    saved = json.loads((Path(straight) / f"eval-step{2 * N:07d}-n4-cfg2-steps2.json").read_text())
    assert saved == res and saved["sampler_steps"] == 2 and saved["num_captions"] == 4


@pytest.mark.parametrize("mixing", ["cross", "joint"])
def test_grad_accumulation_matches_large_batch(root, mixing):
    meta = load_meta(f"{root}/digits_text")
    batch = next(make_iterator(meta, f"{root}/digits_text", "train", batch_size=16, seed=0))
    cfg = compose("stage2", ["model=tiny_text", "train.cfg_p=0.5"])
    opt, sched = make_optimizer(cfg.train, cfg.optim)
    model = build_model({**SPEC, "mixing": mixing}, key=jax.random.PRNGKey(0))
    out = []
    for accum, bs in ((1, 16), (4, 4)):
        cfg.train.grad_accum, cfg.train.batch_size = accum, bs
        step = make_train_step(cfg.train, opt, sched, None, text_conditioning)
        state = init_state(jax.tree.map(jnp.copy, model), opt, split_keys(0)[1])
        out.append(step(state, {k: jnp.asarray(v) for k, v in batch.items()}))
    (s1, m1), (s4, m4) = out
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mixing", ["cross", "joint"])
def test_padding_and_null_caption(mixing):
    model = build_model({**SPEC, "mixing": mixing}, key=jax.random.PRNGKey(0))
    model = perturbed(model)  # open the zero-initialised gates, as training would
    x, t = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 1)), jnp.float32(0.4)
    text = jax.random.normal(jax.random.PRNGKey(2), (8, 384))
    mask = jnp.arange(8) < 3
    out = model(x, t, text, mask, jnp.bool_(False))
    junk = text.at[3:].set(100.0)   # padding positions carry garbage: no effect
    np.testing.assert_allclose(model(x, t, junk, mask, jnp.bool_(False)), out, atol=1e-5)
    other = text.at[1].set(-text[1])  # a real token changes the output
    assert float(jnp.abs(model(x, t, other, mask, jnp.bool_(False)) - out).max()) > 1e-4
    # drop=True ignores the caption entirely (the learned null caption replaces it)
    np.testing.assert_array_equal(model(x, t, text, mask, jnp.bool_(True)), model(x, t, other, mask, jnp.bool_(True)))


def test_prompt_sampling_with_guidance(root):
    meta = load_meta(f"{root}/digits_text")
    caps = load_text(meta, f"{root}/digits_text", "train")
    assert caps["caption"][0].startswith("a handwritten digit") and caps["text"].shape[1:] == (8, 384)
    model = build_model({**SPEC, "mixing": "cross"}, key=jax.random.PRNGKey(0))
    model = perturbed(model)
    conds = text_conds(caps["text"][:5], caps["mask"][:5])
    from omegaconf import OmegaConf
    sc = lambda s: OmegaConf.create({"solver": "euler", "steps": 4, "rtol": 1e-3, "atol": 1e-3, "cfg_scale": s,
                                     "chunk": 2})
    run = lambda s, seed=0: sample(model, conds, jax.random.PRNGKey(seed), null_cond=text_null, shape=(8, 8, 1),
                                   sampler_cfg=sc(s))
    a = run(3.0)
    assert a.shape == (5, 8, 8, 1) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, run(3.0))            # deterministic, chunked
    assert not np.allclose(a, run(1.0))                   # guidance changes the result
    null_only = (conds[0], conds[1], np.ones(5, bool))
    b = sample(model, null_only, jax.random.PRNGKey(0), null_cond=text_null, shape=(8, 8, 1), sampler_cfg=sc(3.0))
    np.testing.assert_allclose(b, sample(model, null_only, jax.random.PRNGKey(0), null_cond=text_null,
                                         shape=(8, 8, 1), sampler_cfg=sc(1.0)), atol=1e-5)  # null vs null: no guidance


def test_prompts_share_exactly_the_images_asked_for(root, capsys):
    """sample.py prompt=[...] num_samples=N: N images split over the prompts in order (10 over 3: 4, 3, 3), each
    prompt's conditions equal to its own encoding; fewer than the prompts: one each, said aloud."""
    from data.prompts import prompt_conds

    meta = load_meta(f"{root}/digits_text")
    prompts = ["a handwritten digit 1", "a handwritten digit 7", "a handwritten digit 3"]
    idx, conds, got = prompt_conds(prompts, 10, meta, f"{root}/digits_text")
    assert got == prompts and np.bincount(idx).tolist() == [4, 3, 3] and len(conds[0]) == 10
    from omegaconf import OmegaConf   # sample.py's prompt=[...] arrives as a ListConfig, not a list: the same prompts
    assert prompt_conds(OmegaConf.create({"p": prompts}).p, 10, meta, f"{root}/digits_text")[2] == prompts
    one, c1, _ = prompt_conds(prompts[1], 1, meta, f"{root}/digits_text")
    np.testing.assert_array_equal(np.asarray(conds[0])[4], np.asarray(c1[0])[0])
    capsys.readouterr()
    idx, _, _ = prompt_conds(prompts, 2, meta, f"{root}/digits_text")
    assert idx.tolist() == [0, 1, 2] and "one image per prompt" in capsys.readouterr().out
    # No prompt named: training captions spread over the set, never more of them than the images asked for
    idx, _, got = prompt_conds(None, 3, meta, f"{root}/digits_text")
    assert idx.tolist() == [0, 1, 2] and len(got) == 3 and "one image per prompt" not in capsys.readouterr().out
    assert len(prompt_conds(None, 20, meta, f"{root}/digits_text")[2]) == 8


@pytest.mark.parametrize("mixing", ["cross", "joint"])
def test_printed_flops_count_the_text_path(mixing):
    """The GFLOPs printed at start include the caption path (joint runs a whole stream over the caption tokens).
    Checked against XLA's own count of the compiled forward, which also counts elementwise ops: within 15%.
    Blocks unrolled: XLA's cost analysis counts a scanned (while-loop) body once, not depth times."""
    from models import forward_flops
    spec = {"hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 2, "mlp_ratio": 4.0, "input_size": [16, 16],
            "in_channels": 3, "num_classes": 1, "mixing": mixing, "text_dim": 96, "max_tokens": 12,
            "scan_blocks": False}
    model = build_model(spec, key=jax.random.PRNGKey(0))
    args = (jnp.zeros((16, 16, 3)), jnp.float32(0.5), jnp.zeros((12, 96)), jnp.ones(12, bool), jnp.bool_(False))
    xla = jax.jit(lambda *a: model(*a)).lower(*args).compile().cost_analysis()
    xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
    ours = forward_flops(spec)["forward_flops"]
    assert abs(ours - xla) / xla < 0.15, (ours, xla)


def test_weak_model_from_another_run_is_checked_on_the_text_inputs():
    """A stage-2 strong model has no num_classes: the weak run is compared on what the TextDiT takes instead."""
    from omegaconf import OmegaConf

    from training.errors import UserError
    from training.generate import check_weak_run

    spec = {**SPEC, "mixing": "cross"}
    strong = build_model(spec, key=jax.random.PRNGKey(0))
    tc = OmegaConf.create({"prediction": "v", "t_eps": 0.05})
    saved = lambda **over: {"model_spec": {**spec, **over}, "train": {"prediction": "v", "t_eps": 0.05}}
    check_weak_run(saved(mixing="joint", hidden_size=16, num_classes=3), strong, tc, "/weak")  # same inputs: fine
    with pytest.raises(UserError, match=r"max_tokens 6 vs 8"):
        check_weak_run(saved(max_tokens=6), strong, tc, "/weak")
    with pytest.raises(UserError, match=r"conditioning class labels vs captions"):
        check_weak_run(saved(mixing=None), strong, tc, "/weak")


def test_text_eval_mistakes_end_in_one_line(tmp_path, capsys):
    import json

    from training import text_eval

    stage1 = tmp_path / "s1"
    (stage1 / "2" / "config").mkdir(parents=True)
    (stage1 / "2" / "config" / "metadata").write_text(json.dumps({"model_spec": {"num_classes": 10}}))
    for argv, needle in (([], "name the stage-2 run's checkpoint directory first"),
                         ([str(tmp_path / "absent")], "no checkpoint directory"),
                         ([str(stage1), "steps"], "'steps' is not key=value with one of the keys"),
                         ([str(stage1), "steps=four"], "steps must be a whole number"),
                         ([str(stage1)], "is a class-conditional (stage-1) run")):
        with pytest.raises(SystemExit) as exit_:
            text_eval.run(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and needle in err[0], (argv, err)
    # bench/text_class_eval.py (a README command) took a misspelt key silently (1000 samples for num_sample=20), and
    # no arguments or a bare key as tracebacks
    import subprocess
    import sys

    from conftest import ROOT
    for argv, needle in (([], "name the stage-2 run's checkpoint directory first"),
                         ([str(stage1), "num_sample=20"], "'num_sample=20' is not key=value"),
                         ([str(stage1), "cfg_scale"], "'cfg_scale' is not key=value")):
        p = subprocess.run([sys.executable, "bench/text_class_eval.py", *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and needle in err[0], (argv, p.stderr[-2000:])


def test_a_stage1_data_config_is_one_line(monkeypatch, capsys, tmp_path):
    """`train_stage2.py data=digits` (data=fashion_mnist_text mistyped): a traceback (ConfigAttributeError on
    data.kind) before."""
    from faults_helpers import run_cli

    line = run_cli(monkeypatch, capsys, ["data=digits", "model=tiny_text", f"train.ckpt_dir={tmp_path / 'ck'}",
                                         "wandb.mode=disabled"], script=train_stage2.main, config="stage2")
    assert "captioned" in line and "data=fashion_mnist_text" in line
