"""Acceptance: 2N steps straight == N steps, stop, restore, N more -- bitwise (params, EMA, optimizer, next batch)."""

import jax
import numpy as np

import train_stage1
from conftest import restore_final, tiny_overrides
from models import build_model
from training.checkpoint import read_config
from training.cli import compose
from training.state import split_keys

N = 4


def test_resume_is_bitwise_exact(digits_root, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    # hflip on: the augmentation randomness must resume too.
    common = {"data.hflip": True, "train.lr": 3e-3}
    train_stage1.main(compose("config", tiny_overrides(digits_root, straight, steps=2 * N, **common)))
    r1 = train_stage1.main(compose("config", tiny_overrides(digits_root, split, steps=2 * N,
                                                            **common, **{"train.stop_at_step": N})))
    assert r1["step"] == N and "stopped" in r1
    assert read_config(split)[1] == N
    train_stage1.main(compose("config", tiny_overrides(digits_root, split, steps=2 * N, **common,
                                                       **{"train.is_restore": True})))
    data_dir = f"{digits_root}/digits"
    (a, batch_a), (b, batch_b) = (restore_final(d, "config", data_dir, hflip=True) for d in (straight, split))
    assert int(a.step) == int(b.step) == 2 * N
    for name in ("params", "ema", "opt_state", "key", "skipped"):
        la, lb = jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    for k in batch_a:
        np.testing.assert_array_equal(batch_a[k], batch_b[k])
    # And training actually moved the weights (a resume that restored nothing would fail above, but be sure).
    init = build_model(read_config(straight)[0]["model_spec"], key=split_keys(0)[0])
    assert not np.array_equal(np.asarray(init.final.weight), np.asarray(a.params.final.weight))
