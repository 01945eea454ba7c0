"""Acceptance: 2N steps straight == N steps, stop, restore, N more -- bitwise (params, EMA, optimizer, next batch)."""

import numpy as np
import pytest

import train_stage1
from conftest import assert_same_state, restore_final, tiny_overrides
from faults_helpers import run_cli
from models import build_model
from training.checkpoint import read_config
from training.cli import compose
from training.state import split_keys

N = 4


# Routed: the kept tokens are drawn from (seed, step) inside the step, so they resume too.
@pytest.mark.parametrize("optim,extra", [("adamw", {}), ("muon", {}),
                                         ("muon", {"train.route": "[0,2,0.5]"})],
                         ids=["adamw", "muon", "muon-routed"])
def test_resume_is_bitwise_exact(digits_root, tmp_path, optim, extra):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    # hflip on: the augmentation randomness must resume too.
    common = {"data.hflip": True, "train.lr": 3e-3, "optim": optim, **extra}
    train_stage1.main(compose("config", tiny_overrides(digits_root, straight, steps=2 * N, **common)))
    r1 = train_stage1.main(compose("config", tiny_overrides(digits_root, split, steps=2 * N,
                                                            **common, **{"train.stop_at_step": N})))
    assert r1["step"] == N and "stopped" in r1
    assert read_config(split)[1] == N
    train_stage1.main(compose("config", tiny_overrides(digits_root, split, steps=2 * N, **common,
                                                       **{"train.is_restore": True})))
    a, b = (restore_final(d, digits_root) for d in (straight, split))
    assert int(a[0].step) == 2 * N
    assert_same_state(a, b)   # params, EMA, optimizer state, key, counters and the next batch, bitwise
    a = a[0]
    # And training actually moved the weights (a resume that restored nothing would fail above, but be sure).
    init = build_model(read_config(straight)[0]["model_spec"], key=split_keys(0)[0])
    assert not np.array_equal(np.asarray(init.final.weight), np.asarray(a.params.final.weight))


# ------------------------------------------------------------------------------------ overrides on resume

def test_resume_settings_allow_list():
    """Which overrides a resume may change: every key that shapes the run's math or data order is named with its
    saved and new value; cadences, paths, tracking, sampling, evaluation and the mesh are free; a key an older
    checkpoint's config lacks is unknown, not a change."""
    import copy

    from omegaconf import OmegaConf

    from training.errors import UserError
    from training.settings import check_resume_settings, settings_changed

    for name in ("config", "stage2"):
        saved = OmegaConf.to_container(compose(name, []), resolve=True)
        saved.update(model_spec={"depth": 6}, data_identity={"name": "x"}, run={"wandb_id": "abc"})

        def changed(**over):
            now = copy.deepcopy(saved)
            for key, value in over.items():
                group, leaf = key.split("__")
                assert leaf in now[group] or name == "stage2", key   # a real key of the shipped config
                now[group][leaf] = value
            now["run"] = {"wandb_id": None}
            return [k for k, _, _ in settings_changed(saved, now)]

        must = dict(train__batch_size=7, train__grad_accum=2, train__seed=1, train__lr=1.0, train__steps=3,
                    train__prediction="v", train__t_eps=0.2, train__time_sampling="uniform", train__time_mean=0.0,
                    train__time_std=1.5, train__time_uniform_frac=0.3, train__time_stratified=True,
                    train__loss_weight_max=5.0, train__cfg_p=0.3, train__ema_decay=0.5, train__ema_warmup=False,
                    train__ema_warmup_offset=3, train__route=[1, 3, 0.5], train__precision="bfloat16",
                    optim__weight_decay=0.3, optim__b2=0.5, optim__warmup_steps=7, optim__schedule="constant",
                    optim__min_lr_ratio=0.5, optim__clip_norm=9.0, data__hflip=True, data__workers=3)
        for key, value in must.items():
            if key.split("__")[1] in saved[key.split("__")[0]]:   # stage 2 has no train.route
                assert changed(**{key: value}) == [key.replace("__", ".")], key
        free = dict(train__log_every=1, train__sample_every=0, train__ckpt_every=1, train__keep_ckpts=1,
                    train__ckpt_dir="/elsewhere", train__progress=False, train__stop_at_step=3, train__max_bad_steps=2,
                    train__is_restore=True, train__debug_nan_steps=[2], train__resume_changes=True,
                    wandb__mode="disabled", sampler__steps=3, sampler__cfg_scale=9.0, eval__at_end=False,
                    mesh__fsdp=2, distributed__timeout_s=9, data__root="/moved", model__remat=True)
        assert changed(**free) == []
    # An older checkpoint's config without a key (written before it existed) is not refused for it; nor is a key
    # the current code no longer has.
    saved = OmegaConf.to_container(compose("config", []), resolve=True)
    old = copy.deepcopy(saved)
    del old["train"]["time_stratified"]
    old["train"]["retired_key"] = 1
    now = copy.deepcopy(saved)
    now["train"]["time_stratified"] = not saved["train"]["time_stratified"]
    assert settings_changed(old, now) == []
    # The refusal: one line, every changed key as `key: saved X -> now Y`, what to do.
    now = copy.deepcopy(saved)
    now["train"].update(batch_size=16, route=[1, 3, 0.5], loss_weight_max=None)
    now["train"]["loss_weight_max"], saved["train"]["loss_weight_max"] = None, 4.0
    tc = OmegaConf.create({"ckpt_dir": "ck", "resume_changes": False})
    with pytest.raises(UserError) as e:
        check_resume_settings(saved, now, tc, 40)
    msg = str(e.value)
    assert "\n" not in msg and "(step 40)" in msg and "resume with the run's own values" in msg, msg
    assert f"train.batch_size: saved {saved['train']['batch_size']} -> now 16" in msg, msg
    assert "train.route: saved null -> now [1,3,0.5]" in msg and "train.loss_weight_max: saved 4.0 -> now null" in msg
    assert "train.resume_changes=true" in msg
    # The escape hatch lets them through (returned, to be recorded)...
    tc.resume_changes = True
    assert [k for k, _, _ in check_resume_settings(saved, now, tc, 40)] == [
        "train.batch_size", "train.loss_weight_max", "train.route"]
    # ...but not a new data.workers: the saved loader position cannot be read by another loader.
    now["data"]["workers"] = saved["data"]["workers"] + 2
    with pytest.raises(UserError, match=r"data\.workers: saved 0 -> now 2.*data\.workers cannot change on resume"):
        check_resume_settings(saved, now, tc, 40)


def _files(d) -> dict:
    from pathlib import Path
    return {str(p): p.stat().st_size for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_resume_refuses_changed_settings(digits_root, tmp_path, monkeypatch, capsys):
    """The real loop: a resume with overrides that change the run is refused in one line before anything is restored
    (nothing written); train.resume_changes=true goes on and records the change in the saved config; a damaged
    latest checkpoint is named in one line, and moving it aside resumes from the previous one."""
    import json
    import shutil

    ck = tmp_path / "run"
    over = lambda **kw: tiny_overrides(digits_root, str(ck), steps=2 * N, **{"train.ckpt_every": 2, **kw})
    r = train_stage1.main(compose("config", over(**{"train.stop_at_step": N})))
    assert r["step"] == N and read_config(str(ck))[1] == N
    before = _files(ck)
    line = run_cli(monkeypatch, capsys, over(**{"train.is_restore": True, "train.batch_size": 16,
                                                   "train.seed": 1, "optim.weight_decay": 0.5}))
    assert f"the checkpoint in {ck} (step {N}) was trained with other settings" in line, line
    for pair in ("train.batch_size: saved 32 -> now 16", "train.seed: saved 0 -> now 1",
                 "optim.weight_decay: saved 0.1 -> now 0.5"):
        assert pair in line, line
    assert "resume with the run's own values (optim.weight_decay=0.1 train.batch_size=32 train.seed=0" in line, line
    assert "train.resume_changes=true" in line, line
    line = run_cli(monkeypatch, capsys, over(**{"train.is_restore": True, "train.resume_changes": True,
                                                   "data.workers": 1}))
    assert "data.workers: saved 0 -> now 1" in line and "cannot change on resume" in line, line
    assert _files(ck) == before   # refused before anything was restored or written

    # A config saved by code that did not record data.workers: the loop cannot tell, the restore itself refuses.
    old = tmp_path / "old"
    shutil.copytree(ck, old)
    meta = old / str(N) / "config" / "metadata"
    cfg = json.loads(meta.read_text())
    del cfg["data"]["workers"]
    meta.write_text(json.dumps(cfg))
    line = run_cli(monkeypatch, capsys, tiny_overrides(digits_root, str(old), steps=2 * N, **{
        "train.ckpt_every": 2, "train.is_restore": True, "data.workers": 1}))
    assert "data loader's saved position" in line and "data.workers" in line, line

    # A damaged latest checkpoint (its array files truncated): named with the step before it; nothing deleted.
    for f in (ck / str(N) / "params").rglob("ocdbt.process_0/d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(16)
    damaged = _files(ck)
    line = run_cli(monkeypatch, capsys, over(**{"train.is_restore": True}))
    assert f"checkpoint {ck / str(N)} cannot be read" in line and f"out of {ck}" in line, line
    assert f"the latest checkpoint is then step {N - 2}" in line, line
    assert _files(ck) == damaged
    shutil.move(str(ck / str(N)), str(tmp_path / f"damaged-{N}"))   # as the message says

    # resume_changes=true: a longer run from step N - 2, knowingly; the saved config records it.
    capsys.readouterr()
    r = train_stage1.main(compose("config", over(**{"train.is_restore": True, "train.resume_changes": True,
                                                    "train.steps": 3 * N, "train.stop_at_step": N})))
    out = capsys.readouterr().out
    assert r["step"] == N and f"resumed from {ck} at step {N - 2}" in out, out
    assert f"train.steps: saved {2 * N} -> now {3 * N}" in out and "no longer the uninterrupted run" in out, out
    saved, step = read_config(str(ck))
    assert step == N and saved["train"]["steps"] == 3 * N
    assert saved["run"]["resume_changes"] == [{"step": N - 2, "changes": {"train.steps": [2 * N, 3 * N]}}]
    # From now on the run's settings are the new ones: a plain resume with them is exact again, and the history stays.
    r = train_stage1.main(compose("config", over(**{"train.is_restore": True, "train.steps": 3 * N,
                                                    "train.stop_at_step": N + 1})))
    assert r["step"] == N + 1
    assert read_config(str(ck))[0]["run"]["resume_changes"] == saved["run"]["resume_changes"]

    # Damaged bytes that still decode (TensorStore keeps no checksum of array data) show up as NaN or Inf, which a
    # saved state never holds (non-finite updates are skipped): refused at restore in one line as well.
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from data.loader import make_iterator
    from data.meta import load_meta
    from training.checkpoint import Checkpointer
    from training.errors import UserError

    state, _ = restore_final(str(ck), digits_root)
    saved, step = read_config(str(ck))
    nan = eqx.tree_at(lambda s: (s.step, s.ema.final.weight), state,
                      (jnp.asarray(step + 1), state.ema.final.weight.at[0, 0].set(jnp.nan)))
    data_dir = f"{digits_root}/digits"
    it = make_iterator(load_meta(data_dir), data_dir, "train", batch_size=32, seed=0)
    with Checkpointer(str(ck), create=False) as c:
        c.save(nan, it, saved, force=True)
    line = run_cli(monkeypatch, capsys, over(**{"train.is_restore": True, "train.steps": 3 * N}))
    assert f"checkpoint {ck / str(step + 1)} cannot be read" in line and "non-finite values in ema" in line, line
    with Checkpointer(str(ck), create=False) as c, pytest.raises(UserError, match="non-finite values in ema"):
        c.restore_weights(build_model(saved["model_spec"], key=jax.random.PRNGKey(0)), step + 1)


def test_a_changed_sampler_on_resume_keeps_the_weak_models_checkpoint(digits_root, tmp_path, monkeypatch, capsys):
    """sampler.* is free to change on resume, but the step autoguidance reads (the EMA half-way through the run) was
    kept only while the current config named it: a resume with guidance=cfg let Orbax delete it at the next save, and
    nothing gives it back. Kept now across any number of resumes; a new weak step is kept beside it."""
    ck = str(tmp_path / "run")
    steps = lambda: sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit())
    over = lambda **kw: tiny_overrides(digits_root, ck, steps=10, **{"train.ckpt_every": 2, "train.keep_ckpts": 1,
                                                                     "sampler.guidance": "auto", **kw})
    train_stage1.main(compose("config", over(**{"train.stop_at_step": 6})))
    assert steps() == [5, 6]     # guide_fraction 0.5 of 10
    train_stage1.main(compose("config", over(**{"train.is_restore": True, "train.stop_at_step": 8,
                                                "sampler.guidance": "cfg"})))
    assert steps() == [5, 8]
    assert read_config(ck)[0]["run"]["kept_steps"] == [5]
    # The config saved at step 8 no longer autoguides: the record, not the sampler settings, carries step 5 on.
    train_stage1.main(compose("config", over(**{"train.is_restore": True, "sampler.guidance": "auto",
                                                "sampler.guide_step": 9})))
    assert steps() == [5, 9, 10]
    assert read_config(ck)[0]["run"]["kept_steps"] == [5, 9]
    # More steps, knowingly (resume_changes): the weak step moves to half of 16 = 8, which the run passed without
    # saving. Said as such, with the weak step it kept (it read "the run started with other settings")
    line = run_cli(monkeypatch, capsys, over(**{"train.is_restore": True, "train.steps": 16,
                                                "train.resume_changes": True}))
    assert "needs the EMA of step 8" in line and "train.steps 10 -> 16 moves it there, past this run's step 10" in line
    assert "add sampler.guide_step=9 (the weak step this run kept)" in line, line
    # A kept weak step holds only its EMA once newer steps follow it (XL/2: 2.7 of 8.1 GB): sampling reads nothing
    # else, and a resume from it alone is refused in one line
    run = tmp_path / "run"
    assert (run / "5" / "ema").is_dir() and not any((run / "5" / item).exists() for item in ("params", "opt_state"))
    assert (run / "10" / "params").is_dir() and (run / "10" / "opt_state").is_dir()
    for s in (9, 10):
        (run / str(s)).rename(tmp_path / f"away-{s}")
    line = run_cli(monkeypatch, capsys, over(**{"train.is_restore": True}))
    assert f"checkpoint {run / '5'} holds only its EMA" in line and "cannot resume from it" in line, line
